"""engram-edit lookup, gates and rows: what the Engram memory holds for a text or a row."""

from __future__ import annotations

import html
import json as jsonlib
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from commands._options import DeviceOpt, JsonOpt, MemoryOpt, ModelOpt
from commands._output import Output
from engram_edit.checkpoint import MemoryFiles, ModelFiles, open_memory, open_model
from engram_edit.fileio import atomic_write_text
from engram_edit.index import NgramIndex, default_index_for
from engram_edit.inspect import (
    GatesResult,
    LookupResult,
    RowsResult,
    SharedNgram,
    TokenInfo,
    TokenProb,
    gates,
    lookup,
    read_rows,
)
from engram_edit.paths import resolve_model

LayerOpt = Annotated[list[int] | None, typer.Option(
    "--layer", metavar="ID", help="Engram layer id to show (repeat for several). Default: all.")]
TopOpt = Annotated[int, typer.Option("--top", metavar="K", help="Tokens per decoded list.")]
ContextOpt = Annotated[str | None, typer.Option(
    "--context", metavar="TEXT",
    help="Text before TEXT, run through the model first so gates are measured in context.")]
MEMORY_ALONE = ("A split memory directory. Alone (without --model) there is no backbone: "
                "tokenizer and hashing come from it and only tokens, slots, rows and norms "
                "are shown.")
LookupMemoryOpt = Annotated[Path | None, typer.Option("--memory", metavar="DIR",
                                                      help=MEMORY_ALONE)]


NoIndexOpt = Annotated[bool, typer.Option(
    "--no-index", help="Do not show which other corpus n-grams share each row.")]


def _index(files: ModelFiles | MemoryFiles, skip: bool) -> NgramIndex | None:
    return None if skip else default_index_for(files)


def _sharers(shared: list[SharedNgram] | None, ngrams: int | None) -> str:
    if shared is None:
        return ""
    names = ", ".join(f"{_show(s.ngram)} {s.count}" for s in shared)
    return f"{ngrams} n-grams" + (f": {names}" if names else "")


def _open(model: Path | None, memory: Path | None) -> ModelFiles | MemoryFiles:
    """A memory alone when only --memory is given, else the resolved model (+ memory)."""
    if memory is not None and model is None:
        return open_memory(memory)
    return open_model(resolve_model(model).path, memory)


def _show(token: str) -> str:
    """A token as a quoted string, so leading spaces and newlines are visible."""
    return escape(jsonlib.dumps(token, ensure_ascii=False))


def _probs(tops: list[TokenProb] | None) -> str:
    if tops is None:
        return ""
    return "\n".join(f"{_show(t.token)} {t.prob:.3f}" for t in tops)


# --- lookup ----------------------------------------------------------------------------------

def lookup_command(
    text: Annotated[str, typer.Argument(help="The text to look up (not stripped).")],
    model: ModelOpt = None,
    memory: LookupMemoryOpt = None,
    layer: LayerOpt = None,
    top: TopOpt = 5,
    all_ngrams: Annotated[bool, typer.Option(
        "--all", help="Also the padded n-grams that reach back before the text.")] = False,
    context: ContextOpt = None,
    no_index: NoIndexOpt = False,
    device: DeviceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Show the tokens of TEXT, the slot and row every n-gram hashes to, and what
    the rows say.

    Per Engram layer, position and order n: the n-gram, and per head its
    column, slot, global row and row norm. With a backbone also:

    - memory says: a logit lens over the n-gram's own rows. They fill their
      columns (the other columns zero), go through the value projection with
      its bias, are added with gate 1 to every stream of otherwise empty
      streams (ShortConv left out), and are read as the model reads its
      streams: readout, final norm, LM head, softmax. Top K tokens.
    - gate: the gate of every hyper-connection branch at that position when
      the text (after --context) runs through the model.
    - next token: the model's prediction there with the memory on and off.

    With a corpus n-gram index (the bundled model ships one; `engram-edit
    index` builds others), every head also shows how crowded its slot is and
    the most frequent other n-grams that read the same row.

    Examples:
      engram-edit lookup "Princess of Wales"
      engram-edit lookup "Princess of Wales" --context "Diana," --layer 2 --top 10
      engram-edit lookup "Princess of Wales" --memory my-memory --json
    """
    out = Output(json)
    files = _open(model, memory)
    result = lookup(files, text, layers=layer, top_k=top, include_padded=all_ngrams,
                    context=context, device=device, index=_index(files, no_index))
    out.result(asdict(result), lambda console: _render_lookup(console, result, out))


def _merged(token: TokenInfo, most: int = 6) -> str:
    others = [m for m in token.merged if m.id != token.id]
    shown = [f"{m.id} {_show(m.text)}" for m in others[:most]]
    if len(others) > most:
        shown.append(f"... and {len(others) - most} more")
    return "\n".join(shown)


def _render_lookup(console: Console, r: LookupResult, out: Output) -> None:
    title = f"{_show(r.text)}" + (f" after {_show(r.context)}" if r.context else "")
    console.print(f"[bold]{title}[/bold]" + ("" if r.backbone else "  (memory alone)"))
    rows = [[i, t.id, _show(t.text), t.compressed_id, _merged(t)]
            for i, t in enumerate(r.tokens)]
    console.print(out.table("tokens", ["pos", "id", "token", "compressed id",
                                       "merged into it (raw id token)"], rows))
    for layer in r.layers:
        columns = ["pos", "n", "n-gram", "head", "column", "slot", "row", "norm"]
        if r.backbone:
            columns += ["memory says", "gate (branch)"]
        indexed = any(h.sharers is not None for g in layer.ngrams for h in g.heads)
        if indexed:
            columns.append("slot shared with (corpus count)")
        rows = []
        for g in layer.ngrams:
            heads = [[str(getattr(h, k)) for h in g.heads] for k in ("head", "column", "slot",
                                                                      "row")]
            row = [g.position, g.order, f"{_show(g.text)}" + ("\n(padded)" if g.padded else ""),
                   *("\n".join(col) for col in heads), "\n".join(f"{h.norm:.3f}" for h in g.heads)]
            if r.backbone:
                row += [_probs(g.decoded),
                        "\n".join(f"{x:.3f} ({b})" for b, x in enumerate(g.gate or []))]
            if indexed:
                row.append("\n".join(_sharers(h.sharers, h.slot_ngrams) for h in g.heads))
            rows.append(row)
        console.print(out.table(f"Engram layer {layer.layer_id}", columns, rows, show_lines=True))
        if not layer.ngrams:
            console.print("no n-gram lies inside the text; --all shows the padded ones")
    if r.backbone:
        rows = [[i, _show(t.text), _probs(t.prediction.memory_on),
                 _probs(t.prediction.memory_off)]
                for i, t in enumerate(r.tokens) if t.prediction is not None]
        console.print(out.table("next token", ["pos", "after", "memory on", "memory off"],
                                rows, show_lines=True))


# --- gates -----------------------------------------------------------------------------------

def _colour(value: float) -> tuple[int, int, int]:
    """White (gate 0) to red (gate 1), as in the paper's gate figure."""
    v = min(max(value, 0.0), 1.0)
    fade = round(255 * (1 - v))
    return 255, fade, fade


def _cell(token: str) -> str:
    return token.replace("\n", "\u23ce").replace("\t", "\u21e5")


def gates_command(
    text: Annotated[str, typer.Argument(help="The text to run through the model.")],
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    layer: LayerOpt = None,
    branch: Annotated[int | None, typer.Option(
        "--branch", metavar="B", help="Show one hyper-connection branch's gate instead of the "
                                      "mean over branches.")] = None,
    context: ContextOpt = None,
    html_file: Annotated[Path | None, typer.Option(
        "--html", metavar="FILE", help="Also write the heatmap as a standalone HTML page.")
                         ] = None,
    device: DeviceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Show the Engram gate at every token of TEXT as a heatmap, one row per Engram
    layer.

    A cell's colour goes from white (gate 0) to red (gate 1): the mean over
    hyper-connection branches, or branch --branch. Entities and set phrases
    light up where the memory is used. --json gives every branch's numbers.

    Examples:
      engram-edit gates "Diana, Princess of Wales, was born in 1961."
      engram-edit gates "the Milky Way" --branch 0 --html gates.html
    """
    out = Output(json)
    result = gates(_open(model, memory), text, context=context, layers=layer, branch=branch,
                   device=device)
    if html_file is not None:
        atomic_write_text(html_file, _gates_html(result))
        out.note(f"wrote {html_file}")
    out.result(asdict(result), lambda console: _render_gates(console, result))


def _what(r: GatesResult) -> str:
    return "mean over branches" if r.branch is None else f"branch {r.branch}"


def _render_gates(console: Console, r: GatesResult) -> None:
    console.print(f"[bold]Engram gates[/bold] ({_what(r)}; white 0 -> red 1)"
                  + (f", after {_show(r.context)}" if r.context else ""))
    width = max(len(f"layer {g.layer_id}") for g in r.layers) + 2
    for layer in r.layers:
        line = Text()
        line.append(f"layer {layer.layer_id}".ljust(width), style="bold")
        for token, value in zip(r.tokens, layer.values, strict=True):
            red, green, blue = _colour(value)
            line.append(_cell(token), style=f"black on rgb({red},{green},{blue})")
        console.print(line)
    legend = Text("".ljust(width))
    for step in range(11):
        red, green, blue = _colour(step / 10)
        legend.append(f"{step / 10:.1f} ", style=f"black on rgb({red},{green},{blue})")
    console.print(legend)


def _gates_html(r: GatesResult) -> str:
    rows = []
    for layer in r.layers:
        cells = []
        for token, value, per_branch in zip(r.tokens, layer.values, layer.gates, strict=True):
            red, green, blue = _colour(value)
            tip = f"{value:.3f} (branches {' '.join(f'{g:.3f}' for g in per_branch)})"
            cells.append(f'<span class="tok" style="background:rgb({red},{green},{blue})" '
                         f'title="{html.escape(tip)}">{html.escape(_cell(token))}</span>')
        rows.append(f'<div class="layer"><span class="label">layer {layer.layer_id}</span>'
                    f'{"".join(cells)}</div>')
    legend = "".join(f'<span class="tok" style="background:rgb{_colour(s / 10)}">{s / 10:.1f}'
                     f'</span>' for s in range(11))
    context = (f"<p>after <code>{html.escape(r.context)}</code></p>" if r.context else "")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Engram gates: {html.escape(r.text[:60])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.layer {{ font-family: monospace; font-size: 15px; margin: 0.6em 0; white-space: pre-wrap; }}
.label {{ display: inline-block; width: 6em; font-weight: bold; }}
.tok {{ padding: 2px 0; color: black; }}
</style>
</head>
<body>
<h1>Engram gates</h1>
<p>{html.escape(_what(r))}; white = gate 0, red = gate 1. Hover a token for its value.</p>
{context}
{chr(10).join(rows)}
<div class="layer"><span class="label">scale</span>{legend}</div>
</body>
</html>
"""


# --- rows ------------------------------------------------------------------------------------

def rows_command(
    layer: Annotated[int, typer.Argument(help="Engram layer id.", show_default=False)],
    rows: Annotated[list[int], typer.Argument(help="Global row ids in that layer's table.",
                                              show_default=False)],
    model: ModelOpt = None,
    memory: LookupMemoryOpt = None,
    full: Annotated[bool, typer.Option("--full", help="Every value, not the first 8.")
                    ] = False,
    top: TopOpt = 5,
    no_index: NoIndexOpt = False,
    device: DeviceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Show raw table rows: dtype, norm, values, their column and slot, and what
    they say.

    "memory says" is the logit lens of `lookup` for the row alone in its
    column (every other column zero); it needs a backbone.

    Examples:
      engram-edit rows 2 51965 98138
      engram-edit rows 0 5 --full --memory my-memory --json
    """
    out = Output(json)
    files = _open(model, memory)
    result = read_rows(files, layer, rows, full=full, top_k=top, device=device,
                       index=_index(files, no_index))
    out.result(asdict(result), lambda console: _render_rows(console, result, out))


def _render_rows(console: Console, r: RowsResult, out: Output) -> None:
    console.print(f"[bold]Engram layer {r.layer_id}[/bold]: {r.num_rows:,} rows of {r.width} "
                  f"{r.dtype} values")
    decoded = any(i.decoded is not None for i in r.rows)
    columns = ["row", "column (order, head)", "slot", "norm", "values"]
    if decoded:
        columns.append("memory says")
    indexed = any(i.sharers is not None for i in r.rows)
    if indexed:
        columns.append("slot shared with (corpus count)")
    table_rows = []
    for i in r.rows:
        values = " ".join(f"{v:+.4f}" for v in i.values)
        if len(i.values) < r.width:
            values += " ..."
        row = [i.row, f"{i.column} ({i.order}, {i.head})", i.slot, f"{i.norm:.4f}", values]
        if decoded:
            row.append(_probs(i.decoded))
        if indexed:
            row.append(_sharers(i.sharers, i.slot_ngrams))
        table_rows.append(row)
    console.print(out.table(None, columns, table_rows, show_lines=True))


def register(app: typer.Typer) -> None:
    app.command("lookup")(lookup_command)
    app.command("gates")(gates_command)
    app.command("rows")(rows_command)
