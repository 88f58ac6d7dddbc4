"""engram-edit eval: how much of what the model knows lives in its memory (ablation), and the
edit metrics of a fact file on the model as it is."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from commands._options import DeviceOpt, JsonOpt, MemoryOpt, ModelOpt, PlacementOpt
from commands._output import Output
from engram_edit.errors import BadInputError
from engram_edit.paths import bundled_heldout_file, bundled_probes_file, resolve_model


def eval_command(
    facts: Annotated[Path | None, typer.Argument(
        metavar="FACTS", help="A fact file (as for `patch`): report its edit metrics for the "
        "model as it is, without editing.", show_default=False)] = None,
    ablate: Annotated[bool, typer.Option(
        "--ablate", help="Compare memory on and off (always so without FACTS; with FACTS it "
        "adds a memory-off column).")] = False,
    probes: Annotated[Path | None, typer.Option(
        metavar="FILE", help="JSONL of {prompt, target} factual completions. Default: the "
        "entity completions mined from the bundled model's training corpus.")] = None,
    heldout: Annotated[Path | None, typer.Option(
        metavar="FILE", help="JSONL of {text} held-out documents. Default: the bundled "
        "model's validation split.")] = None,
    min_count: Annotated[int | None, typer.Option(
        "--min-count", metavar="N", help="Only the entity probes that occur at least N times "
        "in the corpus (their \"count\" field), e.g. 10 for the frequent entity n-grams.",
        show_default=False)] = None,
    windows: Annotated[int, typer.Option(help="Held-out windows of 256 tokens.")] = 32,
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    device: DeviceOpt = None,
    placement: PlacementOpt = None,
    json: JsonOpt = False,
) -> None:
    """Top-1 accuracy and loss with the memory on and off, on factual completions
    and on plain held-out text.

    facts: share of prompts whose greedy continuation is the whole target, and
    the targets' mean per-token loss; then the same per relation and phrasing
    ("capital (heldout)": a wording the training text never uses), where the
    probes name them. text: next-token top-1 accuracy and loss on held-out
    windows. "kept" is top-1 without memory divided by top-1 with it
    (the paper: factual QA keeps 29-44%, reading comprehension 81-93%).

    With FACTS: the metric set of `patch` (says, paraphrase_says, EasyEdit's
    and CounterFact's metrics; docs/metrics.md), the model itself the
    reference of the locality and neighbourhood metrics.

    Examples:
      engram-edit eval --ablate
      engram-edit eval --min-count 10
      engram-edit eval --probes my_probes.jsonl --json
      engram-edit eval fixes.jsonl --ablate
    """
    import numpy as np

    from engram_edit.checkpoint import load_model
    from engram_edit.eval import (
        METRICS_VERSION,
        fact_ablation,
        read_probes,
        relation_group,
        text_ablation,
    )
    from engram_edit.train import tokenize_texts

    if windows < 1:
        raise BadInputError(f"--windows: must be at least 1, got {windows}")
    if min_count is not None and facts is not None:
        raise BadInputError("--min-count filters the probes; it does not apply to FACTS")
    if facts is not None:
        _eval_facts(facts, ablate, heldout, model, memory, device, placement, json)
        return
    files, net = load_model(resolve_model(model).path, memory, device,
                            placement and placement.value)
    probe_list = read_probes(probes or bundled_probes_file(), min_count)
    stream = tokenize_texts(heldout or bundled_heldout_file(), files.tokenizer)
    facts_rows = fact_ablation(net, files.tokenizer, probe_list, group_by=[relation_group])
    if len(facts_rows) == 2:  # a single group repeats the total
        facts_rows = facts_rows[:1]
    rows = [*facts_rows, text_ablation(net, np.asarray(stream), windows=windows)]
    result = {"metrics_version": METRICS_VERSION, "min_count": min_count,
              "rows": [{**asdict(r), "kept": r.kept} for r in rows]}
    Output(json).result(result, lambda console: _render(console, rows, min_count))


def _eval_facts(facts: Path, ablate: bool, heldout: Path | None, model: Path | None,
                memory: Path | None, device: str | None, placement, json: bool) -> None:
    from commands.patch import render_metrics
    from engram_edit.checkpoint import load_model
    from engram_edit.edit.compute import measure_facts
    from engram_edit.edit.facts import read_facts
    from engram_edit.train import tokenize_texts

    fact_list = read_facts(facts)
    files, net = load_model(resolve_model(model).path, memory, device,
                            placement and placement.value)
    stream = tokenize_texts(heldout or bundled_heldout_file(), files.tokenizer)
    m = measure_facts(net, files.tokenizer, fact_list, stream, ablate=ablate)
    result = {"facts": m.facts, "metrics_version": m.metrics_version, "memory": asdict(m.memory)}
    if m.no_memory is not None:
        result["no_memory"] = asdict(m.no_memory)
    columns = {"memory on": m.memory}
    if m.no_memory is not None:
        columns["memory off"] = m.no_memory
    Output(json).result(result, lambda console: render_metrics(
        console, f"{m.facts} facts of {facts}", columns))


def _render(console: Console, rows, min_count: int | None) -> None:
    from rich.table import Table

    title = "memory ablation" + (f" (probes with count >= {min_count})" if min_count else "")
    table = Table(title=title, title_justify="left")
    for name in ("set", "items", "top-1 memory on", "top-1 off", "kept", "loss on", "loss off"):
        table.add_column(name, justify="right" if name != "set" else "left")
    for r in rows:
        table.add_row(r.name, f"{r.items:,}", f"{r.top1_memory:.3f}", f"{r.top1_no_memory:.3f}",
                      "-" if r.kept is None else f"{100 * r.kept:.0f}%", f"{r.loss_memory:.3f}",
                      f"{r.loss_no_memory:.3f}", end_section=r.name == "facts")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
