"""engram-edit info: geometry, parameter counts, dtypes and file sizes of a model or memory."""

from __future__ import annotations

from dataclasses import asdict

import typer
from rich.console import Console

from commands._options import JsonOpt, MemoryOpt, ModelOpt
from commands._output import Output, human_bytes, human_count
from engram_edit.checkpoint import (
    ModelInfo,
    describe_memory,
    describe_model,
    open_memory,
    open_model,
)
from engram_edit.paths import resolve_model


def info(model: ModelOpt = None, memory: MemoryOpt = None, json: JsonOpt = False) -> None:
    """Show what a model (or a split memory alone) holds.

    Examples:
      engram-edit info
      engram-edit info --model backbone/ --memory memory/
      engram-edit info --memory memory/ --json
    """
    out = Output(json)
    if memory is not None and model is None:
        result = describe_memory(open_memory(memory))
    else:
        result = describe_model(open_model(resolve_model(model).path, memory))
    out.result(asdict(result), lambda console: _render(console, result, out))


def _render(console: Console, r: ModelInfo, out: Output) -> None:
    c = r.config
    console.print(f"[bold]{r.path}[/bold]  ({r.kind})")
    console.print(f"fingerprint {r.fingerprint}")
    if r.kind != "memory":
        heads = (f"{c['num_attention_heads']} attention heads, "
                 if "num_attention_heads" in c else "")
        console.print(f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {heads}"
                      f"hc_mult {c['hc_mult']}, vocab {r.vocab_size}")
        if r.backbone_parameters is None:
            console.print(f"parameters: Engram tables {human_count(r.table_parameters)}")
        else:
            total = r.backbone_parameters + r.table_parameters
            console.print(f"parameters: {human_count(total)} = backbone "
                          f"{human_count(r.backbone_parameters)} + Engram tables "
                          f"{human_count(r.table_parameters)} "
                          f"({100 * r.table_parameters / max(total, 1):.0f}% in tables)")
    console.print(f"Engram: layers {c['engram_layer_ids']}, orders 2..{c['engram_max_ngram_size']}"
                  f", {c['engram_n_heads']} heads per order, row width {c['engram_head_dim']}, "
                  f"compressed vocab {r.compressed_vocab_size} of {r.vocab_size}")
    rows = [[t.layer_id, f"{t.rows:,}", t.width, t.dtype, human_bytes(t.nbytes),
             ", ".join(f"{p:,}" for p in t.rows_per_column)] for t in r.tables]
    console.print(out.table("tables", ["layer", "rows", "width", "dtype", "bytes",
                                       "rows per column (primes)"], rows))
    files = [[name, human_bytes(size)] for name, size in r.files.items()]
    console.print(out.table("files", ["file", "size"], files))
    for note in r.notes:
        console.print(note)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
