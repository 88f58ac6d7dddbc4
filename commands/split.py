"""engram-edit split, join and convert-memory: ship the Engram tables apart from the backbone."""

from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from commands._options import ForceOpt, JsonOpt, MemoryOpt, ModelOpt, one_path
from commands._output import Output, byte_progress, human_bytes
from engram_edit.errors import BadInputError
from engram_edit.paths import resolve_model
from engram_edit.split import (
    ConvertReport,
    JoinReport,
    SplitReport,
    convert_memory,
    join_model,
    split_model,
)


class RowDtypeChoice(str, Enum):
    fp8 = "fp8"  # float8_e4m3 rows + E8M0 scale per 32 columns (docs/engram.md section 7)
    bf16 = "bf16"
    f16 = "f16"
    f32 = "f32"


def split_command(
    out: Annotated[tuple[Path, Path], typer.Option(
        "--out", metavar="BACKBONE MEMORY",
        help="The two directories to create: the backbone, then the memory.")],
    model_dir: Annotated[Path | None, typer.Argument(
        metavar="MODEL", help="Model directory (same as --model).", show_default=False)] = None,
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Split a model into a backbone and a pluggable memory (the Engram table
    rows).

    The backbone keeps config.json, tokenizer.json and every weight but the
    table rows; the memory gets memory.safetensors, tokenizer.json, memory.json
    and the .engram/ history. Bytes are copied in 4 MB chunks; the outputs
    appear only when complete, and the model is only read.

    A DeepSeek-V4.1 directory's backbone is that directory without its Engram
    tables: files and shards without a table are copied unchanged, shards with
    one are rewritten without it, engram-backbone.json keeps their original
    headers. No V4.1 server can load it alone; it works here with --memory,
    and `join BACKBONE MEMORY --out DIR` gives back the servable original,
    byte for byte.

    Examples:
      engram-edit split my-model --out my-backbone my-memory
      engram-edit split --model my-model --out out/bb out/mem --force --json
    """
    output = Output(json)
    path = one_path(model_dir, model, "MODEL", "--model") or resolve_model(None).path
    with byte_progress(output, "split") as progress:
        report = split_model(path, out[0], out[1], force=force, progress=progress,
                             memory=memory)
    output.result(asdict(report), lambda console: _render_split(console, report))


def _render_split(console: Console, r: SplitReport) -> None:
    console.print(f"wrote backbone {r.backbone}: {r.backbone_tensors} tensors, "
                  f"{human_bytes(r.backbone_bytes)}")
    console.print(f"wrote memory {r.memory}: {r.memory_tensors} tensors, {r.row_dtype} rows, "
                  f"{human_bytes(r.memory_bytes)}"
                  + (", with the .engram/ history" if r.history_copied else ""))
    console.print(f"fingerprint {r.fingerprint}  ({r.seconds:.1f} s)")
    for note in r.notes:
        console.print(note)


def join_command(
    out: Annotated[Path, typer.Option(
        "--out", metavar="MODEL", help="The model directory to create.")],
    backbone_dir: Annotated[Path | None, typer.Argument(
        metavar="BACKBONE", help="Backbone directory (same as --model).",
        show_default=False)] = None,
    memory_dir: Annotated[Path | None, typer.Argument(
        metavar="MEMORY", help="Memory directory (same as --memory).",
        show_default=False)] = None,
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Plug a memory into its backbone and write the whole model.

    The memory must have the backbone's fingerprint and geometry (layer ids,
    rows, width); its row dtype may differ (a convert-memory output plugs in).
    Every tensor comes out bit for bit as it was before split. The backbone of
    a DeepSeek-V4.1 directory gives back that directory, every file byte for
    byte (a memory in another dtype is re-encoded to FP8 rows).

    Examples:
      engram-edit join my-backbone my-memory --out my-model
      engram-edit join --model my-backbone --memory mem-fp8 --out model-fp8
    """
    output = Output(json)
    backbone = one_path(backbone_dir, model, "BACKBONE", "--model") or resolve_model(None).path
    mem = one_path(memory_dir, memory, "MEMORY", "--memory")
    if mem is None:
        raise BadInputError("join needs a memory directory: give MEMORY or --memory")
    with byte_progress(output, "join") as progress:
        report = join_model(backbone, mem, out, force=force, progress=progress)
    output.result(asdict(report), lambda console: _render_join(console, report))


def _render_join(console: Console, r: JoinReport) -> None:
    console.print(f"wrote model {r.out}: {r.tensors} tensors, {r.row_dtype} rows, "
                  f"{human_bytes(r.bytes)}"
                  + (", with the .engram/ history" if r.history_copied else ""))
    console.print(f"fingerprint {r.fingerprint}  ({r.seconds:.1f} s)")


def convert_command(
    dtype: Annotated[RowDtypeChoice, typer.Option(
        "--dtype", help="Row dtype of the new memory; fp8 is E4M3 with an E8M0 scale per 32 "
                        "columns.")],
    out: Annotated[Path, typer.Option(
        "--out", metavar="NEW", help="The memory directory to create.")],
    memory_dir: Annotated[Path | None, typer.Argument(
        metavar="MEMORY", help="Memory directory (same as --memory).",
        show_default=False)] = None,
    memory: MemoryOpt = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Write a copy of a memory with its rows in another dtype.

    Rows are re-encoded chunk by chunk; the fingerprint stays, so the new
    memory plugs into the same backbone. The .engram/ history is not carried
    (its patches hold rows in the old dtype).

    Examples:
      engram-edit convert-memory my-memory --dtype fp8 --out my-memory-fp8
      engram-edit convert-memory --memory my-memory --dtype bf16 --out mem-bf16
    """
    output = Output(json)
    mem = one_path(memory_dir, memory, "MEMORY", "--memory")
    if mem is None:
        raise BadInputError("convert-memory needs a memory directory: give MEMORY or --memory")
    with byte_progress(output, "convert") as progress:
        report = convert_memory(mem, dtype.value, out, force=force, progress=progress)
    output.result(asdict(report), lambda console: _render_convert(console, report))


def _render_convert(console: Console, r: ConvertReport) -> None:
    console.print(f"wrote memory {r.out}: {r.rows:,} rows {r.from_dtype} -> {r.to_dtype}, "
                  f"{human_bytes(r.bytes)}, largest change {r.max_abs_error:.3g}")
    console.print(f"fingerprint {r.fingerprint}  ({r.seconds:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("split")(split_command)
    app.command("join")(join_command)
    app.command("convert-memory")(convert_command)
