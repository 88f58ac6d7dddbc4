"""engram-edit index and search: count a corpus's n-grams per table row; find the rows (and
n-grams) that push the model toward a token."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from commands._options import DeviceOpt, JsonOpt, MemoryOpt, ModelOpt
from commands._output import Output, byte_progress, human_bytes, human_count
from engram_edit.checkpoint import open_memory, open_model
from engram_edit.errors import BadInputError
from engram_edit.index_build import BuildReport
from engram_edit.paths import resolve_model
from engram_edit.search import SearchResult


def index(
    corpus: Annotated[list[Path], typer.Argument(
        metavar="CORPUS...", help="Text files: JSONL with a \"text\" field (.jsonl, .ndjson), "
        "or plain text with one document per paragraph.")],
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE", help="Index file to write. Default: "
        ".engram/ngram-index.safetensors in the model's (or memory's) directory, where lookup, "
        "rows, patch and search find it.")] = None,
    min_count: Annotated[int, typer.Option(
        "--min-count", help="Keep only n-grams seen at least this often.")] = 1,
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    json: JsonOpt = False,
) -> None:
    """Count the n-grams of a corpus as the model's Engram layers hash them.

    The index tells lookup, rows and patch which other n-grams share a table row, and how
    crowded it is; search uses it to name the n-grams behind a row. It depends on the tokenizer
    only, so one index serves every model with the same tokenizer.

    Examples:
      engram-edit index build/corpus/train.jsonl --model my-model
      engram-edit index notes.txt --memory memory/ --min-count 2
      engram-edit index build/corpus/train.jsonl --out ngrams.safetensors --json
    """
    output = Output(json)
    choice = resolve_model(model)
    if memory is not None and model is None:
        files = open_memory(memory)
    else:
        files = open_model(choice.path, memory)
    if out is None:
        if choice.is_bundled and memory is None:
            raise BadInputError("the bundled model is read-only: give --out FILE for its index")
        from engram_edit.index import own_index_file

        out = own_index_file(files)
    from engram_edit.index_build import build_index
    from engram_edit.tensorwrite import CopyProgress

    with byte_progress(output, "indexing") as update:
        report = build_index(corpus, files, out, min_count=min_count,
                             progress=lambda done, total: update(CopyProgress(done, total, "")))
    output.result(asdict(report), lambda console: _render_index(console, report, output))


def _render_index(console: Console, r: BuildReport, out: Output) -> None:
    i = r.info
    console.print(f"[bold]{i.path}[/bold]  ({human_bytes(i.nbytes)})")
    console.print(f"{i.documents:,} documents, {i.tokens:,} tokens from {len(i.sources)} "
                  f"file(s) in {r.seconds:.1f} s ({human_count(int(r.ngrams_per_second))} "
                  f"n-grams/s)")
    rows = [[n, f"{i.occurrences[n]:,}", f"{i.distinct[n]:,}", f"{i.kept[n]:,}"]
            for n in i.orders]
    console.print(out.table("n-grams", ["order", "seen", "distinct",
                                        f"kept (count >= {i.min_count})"], rows))
    rows = [[x.layer_id, f"{x.rows:,}", f"{x.used:,}", f"{x.shared:,}", x.max_ngrams,
             f"{x.mean_ngrams:.2f}"] for x in r.layers]
    console.print(out.table("rows", ["layer", "rows", "used", "shared (2+ n-grams)",
                                     "most n-grams on a row", "n-grams per used row"], rows))


def search(
    query: Annotated[str, typer.Argument(
        metavar="TOKEN_OR_TEXT", help="A text (its first token is searched, e.g. \" Empire\") "
        "or a vocab entry spelled exactly (e.g. \"ĠEmpire\").")],
    layer: Annotated[list[int] | None, typer.Option(
        "--layer", metavar="ID", help="Engram layer to search (repeatable). Default: all.")
                     ] = None,
    top: Annotated[int, typer.Option("--top", metavar="K", help="Rows to show.")] = 10,
    index_file: Annotated[Path | None, typer.Option(
        "--index", metavar="FILE", help="N-gram index naming each row's n-grams. Default: the "
        "model's own, else the bundled one when the tokenizer matches.")] = None,
    no_index: Annotated[bool, typer.Option(
        "--no-index", help="Show rows only, without the n-grams that read them.")] = False,
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    device: DeviceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Which table rows push the model hardest toward a next token, and which n-grams read them.

    A row's push is what it adds to the next-token logits through the value projection, the
    final norm (at its typical scale) and the LM head, at gate 1; rows are ranked by their push
    toward the token, found by exact inner-product search (faiss).

    Examples:
      engram-edit search " Empire"
      engram-edit search " Paris" --layer 2 --top 20
      engram-edit search " Empire" --json
    """
    from engram_edit.checkpoint import load_model
    from engram_edit.index import NgramIndex, default_index_for
    from engram_edit.search import search_rows

    output = Output(json)
    files, net = load_model(resolve_model(model).path, memory, device)
    idx = None
    if index_file is not None:
        idx = NgramIndex.open(index_file, files)
    elif not no_index:
        idx = default_index_for(files)
    result = search_rows(files, net, query, top_k=top, layers=layer, index=idx)
    if idx is None and not no_index:
        output.note("no n-gram index for this model: rows only (build one with "
                    "`engram-edit index CORPUS`)")
    output.result(_plain(asdict(result)), lambda console: _render_search(console, result, output))


def _plain(obj: Any) -> Any:
    """JSON shape of a result: named tuples (Sharer, SlotLoad) become objects."""
    if hasattr(obj, "_asdict"):
        return {k: _plain(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _render_search(console: Console, r: SearchResult, out: Output) -> None:
    if len(r.query_tokens) > 1:
        out.note(f"{r.query!r} is {len(r.query_tokens)} tokens "
                 f"({', '.join(map(repr, r.query_tokens))}); searching for the first")
    rows = []
    for rank, h in enumerate(r.hits, start=1):
        pushes = ", ".join(f"{t.token!r}" for t in h.top_tokens[:3])
        row = [rank, h.layer_id, h.row, f"{h.order}/{h.head}", f"{h.score:.2f}", pushes]
        if h.sharers is not None:
            row.append(", ".join(f"{s.text!r} ({s.count})" for s in h.sharers) or "-")
            row.append(f"{h.load.ngrams} ({h.load.occurrences:,})")
        rows.append(row)
    columns = ["#", "layer", "row", "order/head", "push", "row pushes toward"]
    if r.hits and r.hits[0].sharers is not None:
        columns += ["n-grams on the row (count)", "n-grams (uses)"]
    console.print(out.table(f"rows pushing toward {r.token!r} (token {r.token_id})", columns,
                            rows))
    if r.ngrams is not None:
        rows = [[rank, repr(g.text), f"{g.effect:+.3f}", f"{g.prob:.3f}", f"{g.count:,}",
                 g.layer_id, f"{g.push:.2f}"] for rank, g in enumerate(r.ngrams, start=1)]
        console.print(out.table(
            f"n-grams through which the memory pushes toward {r.token!r}",
            ["#", "n-gram", "memory adds", "p after it", "count", "layer", "rows' push"], rows))
    console.print(f"push: centered logits at gate 1, final-norm scale {r.scale:.3g}; "
                  f"memory adds: probability of the token after the n-gram alone, memory on "
                  f"minus off", style="dim")


def register(app: typer.Typer) -> None:
    app.command("index")(index)
    app.command("search")(search)
