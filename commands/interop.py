"""engram-edit import and export: bring a demo or DeepSeek-V4.1 checkpoint in, write it back out."""

from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from commands._options import ForceOpt, JsonOpt, MemoryOpt, ModelOpt, one_path
from commands._output import Output, byte_progress, human_bytes
from engram_edit.interop import ExportReport, ImportReport, export_model, import_model
from engram_edit.paths import resolve_model


class LayoutChoice(str, Enum):
    demo = "demo"  # deepseek-ai/Engram's engram_demo_v1.py module names and config dataclasses
    v4 = "v4"  # DeepSeek-V4.1: sharded safetensors, FP8 Engram tables, nested text_config


def import_command(
    source: Annotated[Path, typer.Argument(metavar="SRC", help="The checkpoint directory.",
                                           show_default=False)],
    layout: Annotated[LayoutChoice, typer.Option(
        "--from", help="The layout SRC is in (it is checked against SRC's config and tensor "
                       "names).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", metavar="DIR",
                                      help="The engram-edit model directory to create.")],
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Convert a demo or DeepSeek-V4.1 checkpoint into an engram-edit model
    directory.

    Config keys and tensor names are mapped by the layout's declared tables;
    bytes are copied unchanged. What has no mapping is reported: unmapped
    config keys are kept in DIR/import.json; V4.1 tensors outside the Engram
    modules, embedding, final norm and head stay in SRC and are not read.
    A V4.1 directory also works in place with --model, without importing.

    Examples:
      engram-edit import engram-demo --from demo --out my-model
      engram-edit import DeepSeek-V4.1-Flash --from v4 --out v41-engram --json
    """
    output = Output(json)
    with byte_progress(output, "import") as progress:
        report = import_model(source, layout.value, out, force=force, progress=progress)
    output.result(asdict(report), lambda console: _render_import(console, report))


def _render_import(console: Console, r: ImportReport) -> None:
    console.print(f"imported {r.source} ({r.layout} layout) into {r.out}: {r.tensors} tensors, "
                  f"{human_bytes(r.bytes)}  ({r.seconds:.1f} s)")
    if r.referenced:
        console.print(f"{r.referenced} tensors left in {r.source} (not Engram; export copies "
                      f"them back)")
    if r.unmapped_config:
        console.print(f"config keys kept in import.json only: {', '.join(r.unmapped_config)}")
    if r.filled:
        console.print(f"engram-edit defaults used for: {', '.join(r.filled)}")
    for note in r.notes:
        console.print(f"note: {note}")


def export_command(
    layout: Annotated[LayoutChoice, typer.Option(
        "--to", help="The layout to write.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", metavar="DIR",
                                      help="The directory to create.")],
    model_dir: Annotated[Path | None, typer.Argument(
        metavar="MODEL", help="Model directory (same as --model).", show_default=False)] = None,
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Write an engram-edit model, edits included, back in the demo or V4.1 layout.

    With the model's import.json, files keep their source headers byte for
    byte, so an unedited import exports to the same files. v4 needs the
    checkpoint the model was imported from (its other tensors are copied
    from there); tables in another dtype are re-encoded to FP8 per the spec.

    Examples:
      engram-edit export my-model --to demo --out engram-demo-edited
      engram-edit export v41-engram --to v4 --out DeepSeek-V4.1-Flash-edited
    """
    output = Output(json)
    path = one_path(model_dir, model, "MODEL", "--model") or resolve_model(None).path
    with byte_progress(output, "export") as progress:
        report = export_model(path, layout.value, out, memory=memory, force=force,
                              progress=progress)
    output.result(asdict(report), lambda console: _render_export(console, report))


def _render_export(console: Console, r: ExportReport) -> None:
    console.print(f"exported {r.model} to {r.out} ({r.layout} layout): {r.files} files, "
                  f"{r.tensors} tensors written, {human_bytes(r.bytes)}  ({r.seconds:.1f} s)")
    if r.copied_files:
        console.print(f"{r.copied_files} source shards copied unchanged")
    if r.verbatim_headers:
        console.print(f"{r.verbatim_headers} files keep their source header byte for byte")
    if r.requantized:
        console.print(f"tables of layers {r.requantized} re-encoded to FP8 (spec section 7)")


def register(app: typer.Typer) -> None:
    app.command("import")(import_command)
    app.command("export")(export_command)
