"""engram-edit patch and overwrite: compute an edit of the table rows, then apply it (journalled)
or, with --dry-run, only write the patch file."""

from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from commands._options import DeviceOpt, JsonOpt, MemoryOpt, ModelOpt
from commands._output import Output
from engram_edit import paths
from engram_edit.edit.locate import RowChoice
from engram_edit.edit.patch import PATCH_SUFFIX, Patch, write_patch
from engram_edit.errors import BadInputError

NameOpt = Annotated[str | None, typer.Option(
    "--name", help="Name of the patch (history and file name). Default: from FACTS or NGRAM.")]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", metavar="FILE", help="Also write the patch file here.")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Write NAME.patch.safetensors (or --out) and change no model.")]
WaitOpt = Annotated[bool, typer.Option(
    "--wait", help="If another engram-edit is writing these rows, wait for it.")]



class MethodChoice(str, Enum):
    """The choices of --method (engram_edit.edit.compute.Method, which imports torch)."""

    distill = "distill"
    overwrite = "overwrite"


SHOWN_FACTS = 10  # facts in the rows-and-sharers table (--json lists every fact)
SHOWN_SHARERS = 3  # sharers per fact in that table

class GoalChoice(str, Enum):
    """The choices of --goal (engram_edit.edit.distill.GOALS)."""

    says = "says"
    prefers = "prefers"


# engram_edit.eval.FactMetrics's fields, in its order (that module imports torch)
METRIC_KEYS = ("says", "paraphrase_says", "reliability", "generalization", "locality",
               "portability", "efficacy", "efficacy_magnitude", "paraphrase",
               "paraphrase_magnitude", "neighbourhood", "neighbourhood_magnitude",
               "neighbourhood_unchanged", "neighbourhood_kl", "heldout_loss")


def render_metrics(console: Console, title: str, columns: dict[str, Any]) -> None:
    """One row per metric, one column per model state (FactMetrics values or None)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for key in METRIC_KEYS:
        cells = []
        for m in columns.values():
            value = None if m is None else getattr(m, key)
            cells.append("-" if value is None else f"{value:.3f}")
        table.add_row(key, *cells)
    console.print(table)


def _finish(output: Output, patch: Patch, name: str, out: Path | None, dry_run: bool,
            model: Path | None, memory: Path | None, wait: bool) -> Path:
    """Write the patch file(s) and, unless --dry-run, apply it. Returns the patch's path."""
    from engram_edit.edit.journal import apply_patch, check_patch
    from engram_edit.edit.target import open_writable

    if dry_run:
        return write_patch(patch, out or Path(f"{name}{PATCH_SUFFIX}"))
    files, note = open_writable(paths.resolve_model(model), memory,
                                lambda f: check_patch(f, patch, name))
    report = apply_patch(files, patch, name, wait=wait)
    for line in filter(None, [note, report.recovered and report.recovered.describe()]):
        output.note(line)
    if out is not None:
        return write_patch(patch, out)
    return report.copy


def _check_out(name: str, out: Path | None) -> None:
    from engram_edit.edit.store import check_name

    check_name(name)
    if out is not None and not out.name.endswith(PATCH_SUFFIX):
        raise BadInputError(f"--out {out}: a patch file name ends in {PATCH_SUFFIX}")


def patch_command(
    facts: Annotated[Path, typer.Argument(
        metavar="FACTS", help="JSONL fact file (EasyEdit fields or CounterFact records).",
        show_default=False)],
    method: Annotated[MethodChoice, typer.Option(
        "--method", help="distill: a few dozen Adam steps on the located rows, backbone "
        "frozen, with a locality term. overwrite: one closed-form least-squares solve through "
        "the frozen model, no steps (faster, weaker).")] = MethodChoice.distill,
    rows: Annotated[RowChoice, typer.Option(
        "--rows", help="Which rows: n-grams that contain the subject (subject), those ending "
        "where the target is predicted (final), both, or auto (subject less those that only "
        "spell it, such as 'Burkina' before ' Faso', plus those ending at the prompt's last "
        "token that are rare in the corpus n-gram index when there is one).")] = RowChoice.AUTO,
    goal: Annotated[GoalChoice, typer.Option(
        "--goal", help="distill: when a fact is done. says: greedy decoding of its prompt "
        "(and of each rephrase prompt the file gives) yields the whole target, every token "
        "top-1 by 1 nat over the runner-up. prefers: log P(target) beats log P(ground truth) "
        "by 1 nat (CounterFact's efficacy; weaker: the model may still say something "
        "else).")] = GoalChoice.says,
    fit_rephrase: Annotated[bool, typer.Option(
        "--fit-rephrase/--no-fit-rephrase", help="distill: fit the file's rephrase prompts "
        "too (those that hold the subject); --no-fit-rephrase keeps them for measuring "
        "paraphrase_says on wording the edit never saw.")] = True,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="distill: Adam steps at most per batch.")] = None,
    seed: Annotated[int, typer.Option(
        "--seed", help="The same facts, settings and seed give identical rows.")] = 0,
    heldout: Annotated[Path | None, typer.Option(
        metavar="FILE", help="JSONL of {text} held-out documents (locality term and the "
        "heldout_loss metric). Default: the bundled model's validation split.")] = None,
    measure: Annotated[bool, typer.Option(
        "--measure/--no-measure", help="Measure the metrics before and after.")] = True,
    keep_applied: Annotated[bool, typer.Option(
        "--keep-applied/--no-keep-applied", help="distill: keep the facts of patches already "
        "applied to this model solved where they share rows with the new ones.")] = True,
    skip_crowded: Annotated[bool, typer.Option(
        "--skip-crowded/--no-skip-crowded", help="--rows auto with an n-gram index: leave out "
        "an n-gram's heads whose row the other n-grams use > 3x as much as the median of its "
        "other heads' (at most half of its heads).")] = True,
    weigh_rows: Annotated[bool, typer.Option(
        "--weigh-rows/--no-weigh-rows", help="A row costs the number of facts that touch it "
        "(these and, for distill, those of applied patches it keeps) times, with an n-gram "
        "index, what the corpus reads of it (occurrences of the n-grams on it over a median "
        "row's); the rows change at the least total cost, so shared rows move less.")] = True,
    sharer_contexts: Annotated[int, typer.Option(
        "--sharer-contexts", metavar="N", min=0, help="distill with an n-gram index: add to "
        "each fact's locality prompts N corpus texts ending with the top n-grams that share "
        "its rows (0: none).")] = 1,
    corpus: Annotated[list[Path] | None, typer.Option(
        "--corpus", metavar="FILE", help="Corpus text for --sharer-contexts (JSONL with a "
        "text field, or plain text; repeat for more). Default: the files the index was "
        "built from, when they are there.")] = None,
    name: NameOpt = None,
    out: OutOpt = None,
    dry_run: DryRunOpt = False,
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    device: DeviceOpt = None,
    wait: WaitOpt = False,
    json: JsonOpt = False,
) -> None:
    """Edit facts into the memory: compute the rows, write NAME.patch.safetensors,
    apply it.

    The fact file is checked completely first; a bad one changes and creates
    nothing. Every Engram layer's rows of the chosen n-grams are computed so
    that each prompt continues with its target_new, the rest of the model
    frozen. The patch (facts, method, settings, metrics, fingerprint) is
    applied under the journal, with a copy in .engram/; `undo` restores the
    rows bit for bit. With no --model the bundled model is copied to your
    working copy first.

    Metrics (before and after; formulas in docs/metrics.md): says and
    paraphrase_says (greedy output starts with the target, as `generate`
    prints it); EasyEdit's reliability, generalization, locality, portability
    (token top-1 accuracy, teacher forced); CounterFact's efficacy,
    paraphrase and neighbourhood scores with their magnitudes;
    neighbourhood_unchanged, neighbourhood_kl, heldout_loss.

    With a corpus n-gram index (the model's own from `index`, else the bundled
    one), each fact also lists the rows it touched and the other n-grams those
    rows serve. --json adds "sharing": one object per fact, {"prompt",
    "rows": {layer: rows touched}, "left_out": crowded head rows left out,
    "slot_ngrams" and "slot_occurrences": mean indexed n-grams per touched row
    and their mean corpus occurrences, "sharers": [{"ngram", "count", "rows"}]
    (top 10 by corpus count), "more_sharers", "contexts": locality prompts cut
    from the corpus}, or null without an index; "unsolved": one object per fact
    left short of its goal, {"line", "prompt", "lead": the least margin in nats
    of a target token over the runner-up, over its fitted wordings, "rows",
    "rows_at_bound": rows the norm bound holds back, "shares_rows_with": other
    facts of the file changing some of the same rows}; and "notes": a list of
    lines.

    On a DeepSeek-V4.1 directory only --method overwrite runs (distill needs
    the whole network): each located row, alone in its column, is moved to say
    the target's first token over the ground truth's through the logit lens
    (wkv value rows, final norm, LM head), a minimum-norm least-squares change.
    The metrics above need the whole network and are null there; --json adds
    "lens": {"before", "after"}: {"margin": mean lens log P(target) - log
    P(ground truth) of the edited rows, "won": share of them above 0}.

    Examples:
      engram-edit patch fixes.jsonl
      engram-edit patch fixes.jsonl --dry-run --out fixes.patch.safetensors
      engram-edit patch fixes.jsonl --method overwrite --rows both --json
    """
    from engram_edit.checkpoint import build_model, open_model
    from engram_edit.edit.facts import read_facts
    from engram_edit.edit.store import patch_name
    from engram_edit.layouts import v4

    output = Output(json)
    fact_list = read_facts(facts)
    name = name or patch_name(facts.name.removesuffix(".jsonl"))
    _check_out(name, out)
    missing = [f"--corpus {p}: no such file" for p in corpus or [] if not p.is_file()]
    if missing:
        raise BadInputError(missing)
    files = open_model(paths.resolve_model(model).path, memory)
    if files.layout == v4.NAME:
        if method is not MethodChoice.overwrite:
            raise BadInputError(f"{files.path}: --method {method.value} needs the whole "
                                f"network, which engram-edit cannot run for a {files.layout} "
                                f"directory; use --method overwrite (closed form through the "
                                f"logit lens)")
        _lens_patch(output, files, fact_list, rows, measure, name, out, dry_run, model, memory,
                    wait)
        return
    # torch from here on: the lens path above runs without it
    from engram_edit.edit.compute import EditSettings, Method, applied_facts, edit_facts
    from engram_edit.train import tokenize_texts

    chosen = Method(method.value)
    settings = EditSettings(method=chosen, rows=rows, measure=measure,
                            skip_crowded=skip_crowded, weigh_rows=weigh_rows,
                            sharer_contexts=sharer_contexts, fit_rephrase_prompts=fit_rephrase)
    settings.distill.seed = seed
    settings.distill.goal = goal.value
    if steps is not None:
        settings.distill.steps = steps
    net = build_model(files, device, placement="gpu")
    stream = tokenize_texts(heldout or paths.bundled_heldout_file(), files.tokenizer)
    index = _index(files, output)
    keep = applied_facts(files) if keep_applied and chosen is Method.DISTILL else []
    with _progress(output) as on_progress:
        report = edit_facts(files, net, fact_list, settings, stream, index, on_progress, keep,
                            corpus)
    for line in report.notes:
        output.note(line)
    where = _finish(output, report.patch, name, out, dry_run, model, memory, wait)
    result = {"patch": str(where), "facts": report.facts, "rows_touched": report.rows_touched,
              "seconds": report.seconds, "edits_per_s": report.edits_per_s,
              "before": report.before and asdict(report.before),
              "after": report.after and asdict(report.after),
              "goal": settings.distill.goal if chosen is Method.DISTILL else None,
              "unsolved": [{"line": fact_list[u.index].line, "prompt": fact_list[u.index].prompt,
                            "lead": u.lead, "rows": u.rows, "rows_at_bound": u.rows_at_bound,
                            "shares_rows_with": u.shares_rows_with}
                           for u in report.unsolved_facts],
              "sharing": report.sharing and [{"prompt": f.prompt, **s.to_dict()} for f, s in
                                             zip(fact_list, report.sharing, strict=True)],
              "notes": report.notes}
    output.result(result, lambda console: _render_patch(console, result, report, dry_run))


def _lens_patch(output: Output, files, fact_list: list, rows: RowChoice, measure: bool,
                name: str, out: Path | None, dry_run: bool, model: Path | None,
                memory: Path | None, wait: bool) -> None:
    """patch --method overwrite on a V4.1 directory: the closed form through its logit lens."""
    from engram_edit.edit.lens_overwrite import lens_edit

    index = _index(files, output)
    report = lens_edit(files, fact_list, rows=rows,
                       ngram_count=None if index is None else index.ngram_count)
    where = _finish(output, report.patch, name, out, dry_run, model, memory, wait)
    unmeasured = dict.fromkeys(METRIC_KEYS) if measure else None
    result = {"patch": str(where), "facts": report.facts, "rows_touched": report.rows_touched,
              "seconds": report.seconds, "edits_per_s": report.edits_per_s,
              "before": unmeasured, "after": unmeasured, "sharing": None, "notes": [],
              "lens": {"before": asdict(report.before), "after": asdict(report.after)}
              if measure and report.before is not None else None}
    output.result(result, lambda console: _render_lens(console, result, report, dry_run))


def _render_lens(console: Console, result: dict, report, dry_run: bool) -> None:
    verb = "wrote" if dry_run else "applied"
    console.print(f"{verb} {result['patch']}: {report.facts} fact(s), {report.rows_touched} "
                  f"rows, {report.seconds:.1f} s, closed form through the logit lens")
    lens = result["lens"]
    if lens is not None:
        console.print(f"edited rows alone in their columns, mean lens margin log P(target) - "
                      f"log P(ground truth): {lens['before']['margin']:.2f} -> "
                      f"{lens['after']['margin']:.2f} nats; rows saying the target: "
                      f"{lens['before']['won']:.0%} -> {lens['after']['won']:.0%}")
    if report.unsolved:
        console.print(f"{len(report.unsolved)} fact(s) keep a row that says the ground truth")
    console.print("efficacy, paraphrase and locality need the whole network: not measured here")


def _index(files, output: Output):
    """The corpus n-gram index that goes with the model, if any (``--rows auto``, sharers)."""
    from engram_edit.errors import MismatchError
    from engram_edit.index import default_index_for

    try:
        return default_index_for(files)
    except MismatchError as err:
        output.note(f"n-gram index not used: {err.problems[0]}")
        return None


class _progress:
    """A rich progress line on stderr while facts are edited (silent under --json)."""

    def __init__(self, output: Output) -> None:
        self.output = output

    def __enter__(self):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                            TimeElapsedColumn(), console=self.output.err,
                            disable=self.output.json_mode, transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task("reading the model", total=None)

        def update(p) -> None:
            text = p.stage
            if p.stage == "distill":
                text = (f"distill batch {p.batch}/{p.batches}: step {p.step}, "
                        f"{p.done}/{p.facts} facts done")
            self.bar.update(self.task, description=text)

        return update

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)


def _render_patch(console: Console, result: dict, report, dry_run: bool) -> None:
    verb = "wrote" if dry_run else "applied"
    facts = f"{report.facts} fact" + ("s" if report.facts != 1 else "")
    console.print(f"{verb} {result['patch']}: {facts}, {report.rows_touched} rows, "
                  f"{report.seconds:.1f} s ({report.edits_per_s:.1f} edits/s)")
    if report.unsolved:
        missed = result["unsolved"]
        console.print(f"{len(missed)} fact(s) did not reach the goal ({result['goal']}); the "
                      f"rows could not carry them within the steps and the norm bound:")
        for m in missed[:5]:
            console.print(f"  line {m['line']}: {m['prompt']!r}: least margin {m['lead']:+.2f} "
                          f"nats, {m['rows_at_bound']} of {m['rows']} rows at the norm bound, "
                          f"rows shared with {m['shares_rows_with']} other fact(s)",
                          soft_wrap=True)
        if len(missed) > 5:
            console.print(f"  ... and {len(missed) - 5} more (--json lists them all)")
    if report.before is not None:
        render_metrics(console, "metrics", {"before": report.before, "after": report.after})
    if result["sharing"]:
        _render_sharing(console, result["sharing"])


def _render_sharing(console: Console, sharing: list[dict]) -> None:
    """A line per fact (the first SHOWN_FACTS): rows per layer, crowded rows left out, how
    crowded the touched rows are, and the most frequent other n-grams on them."""
    from rich.table import Table

    table = Table(title="rows touched and the other n-grams they serve", title_justify="left")
    for name in ("fact", "rows", "left out", "n-grams/row", "top sharers (corpus count)"):
        table.add_column(name, justify="right" if name in ("left out", "n-grams/row") else "left")
    for s in sharing[:SHOWN_FACTS]:
        rows = ", ".join(f"L{lid} {n}" for lid, n in s["rows"].items())
        shown = [f"{x['ngram']!r} ({x['count']})" for x in s["sharers"][:SHOWN_SHARERS]]
        more = len(s["sharers"]) - len(shown) + s["more_sharers"]
        table.add_row(s["prompt"], rows, str(s["left_out"]), f"{s['slot_ngrams']:.1f}",
                      ", ".join(shown + ([f"+{more} more"] if more else [])) or "-")
    console.print(table)
    if len(sharing) > SHOWN_FACTS:
        console.print(f"... and {len(sharing) - SHOWN_FACTS} more facts (--json lists all)")


def overwrite_command(
    ngram: Annotated[str, typer.Argument(
        metavar="NGRAM", help="The n-gram whose rows change (2 to max-ngram tokens), e.g. "
        "'Princess of'.", show_default=False)],
    copy_from: Annotated[str | None, typer.Option(
        "--copy-from", metavar="NGRAM", help="Copy this n-gram's rows, head by head.")] = None,
    zero: Annotated[bool, typer.Option("--zero", help="Set the rows to zero.")] = False,
    scale: Annotated[float | None, typer.Option(
        "--scale", metavar="S", help="Multiply the rows by S.")] = None,
    layer: Annotated[list[int] | None, typer.Option(
        "--layer", metavar="ID", help="Only this Engram layer (repeat for more). Default: "
        "all.")] = None,
    heads: Annotated[list[int] | None, typer.Option(
        "--heads", metavar="J", help="Only hash head J (repeat for more). Default: all.")
    ] = None,
    name: NameOpt = None,
    out: OutOpt = None,
    dry_run: DryRunOpt = False,
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    wait: WaitOpt = False,
    json: JsonOpt = False,
) -> None:
    """Set the rows of one n-gram directly: copy another n-gram's, zero them, or
    scale them.

    Each hash head's row of NGRAM (at its last token) is changed in every
    Engram layer (or --layer, --heads). Rows shared with other n-grams by
    hashing change for those too. The result is a patch like any other:
    applied under the journal, undone bit for bit, or only written with
    --dry-run. No model is built.

    Examples:
      engram-edit overwrite "Princess of" --copy-from "Prince of"
      engram-edit overwrite "of Wales" --zero --layer 2 --dry-run
      engram-edit overwrite "of Wales" --scale 0.5 --heads 0 --heads 1 --json
    """
    from engram_edit.checkpoint import open_model
    from engram_edit.edit.patch import tool_version
    from engram_edit.edit.rows import NgramOp, ngram_rows, ngram_values, rows_patch
    from engram_edit.edit.store import patch_name

    output = Output(json)
    chosen = [op for op, on in ((NgramOp.COPY, copy_from is not None), (NgramOp.ZERO, zero),
                                (NgramOp.SCALE, scale is not None)) if on]
    if len(chosen) != 1:
        raise BadInputError("give exactly one of --copy-from NGRAM, --zero or --scale S")
    op = chosen[0]
    name = name or patch_name(f"overwrite-{ngram}")
    _check_out(name, out)
    files = open_model(paths.resolve_model(model).path, memory)
    rows = ngram_rows(files, ngram, layer, heads)
    source = None if copy_from is None else ngram_rows(files, copy_from, layer, heads)
    settings = {"ngram": ngram, "op": op.value, "copy_from": copy_from, "scale": scale,
                "layers": sorted(rows), "heads": heads}
    with files.table() as table:
        values = ngram_values(table, rows, op, source, scale)
        patch = rows_patch(table, files.fingerprint(), values, {
            "method": "overwrite-ngram", "settings": settings, "version": tool_version(),
            "fingerprint": files.fingerprint()})
    where = _finish(output, patch, name, out, dry_run, model, memory, wait)
    result = {"patch": str(where), "ngram": ngram, "op": op.value,
              "rows_touched": patch.rows_touched,
              "rows": {str(k): v.tolist() for k, v in rows.items()}}
    output.result(result, lambda console: console.print(
        f"{'wrote' if dry_run else 'applied'} {where}: {op.value} of {ngram!r}, "
        f"{patch.rows_touched} row(s) changed"))


def register(app: typer.Typer) -> None:
    app.command("patch")(patch_command)
    app.command("overwrite")(overwrite_command)
