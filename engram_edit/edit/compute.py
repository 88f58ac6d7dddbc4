"""Computing an edit from facts: locate the rows, run the method, quantize into a Patch, and
measure the model before and after. Nothing on disk changes here: applying the patch
is journal.py's. The model is used as a scratch copy and left as it was given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_edit.checkpoint import ModelFiles
from engram_edit.edit.costs import RowCosts, read_costs
from engram_edit.edit.distill import DistillProgress, DistillSettings, distill
from engram_edit.edit.facts import Fact
from engram_edit.edit.locate import FactRows, FactTokens, RowChoice, locate_rows, tokenize_fact
from engram_edit.edit.overwrite import OverwriteSettings, closed_form, layer_norm_bounds
from engram_edit.edit.patch import Patch, tool_version
from engram_edit.edit.rows import rows_patch
from engram_edit.edit.sharing import FactSharing, corpus_of, facts_sharing, sharer_prompts
from engram_edit.eval import (
    METRICS_VERSION,
    FactMetrics,
    fact_metrics,
    heldout_windows,
    neighbour_reference,
    target_leads,
)
from engram_edit.index import NgramIndex
from engram_edit.model import EngramModel
from engram_edit.tokenizer import EngramTokenizer


class Method(str, Enum):
    """distill: a few dozen Adam steps on the located rows with a locality term (default).
    overwrite: one closed-form least-squares solve through the frozen model, no steps."""

    DISTILL = "distill"
    OVERWRITE = "overwrite"


@dataclass
class EditSettings:
    method: Method = Method.DISTILL
    rows: RowChoice = RowChoice.AUTO
    distill: DistillSettings = field(default_factory=DistillSettings)
    overwrite: OverwriteSettings = field(default_factory=OverwriteSettings)
    measure: bool = True  # measure the metric set before and after
    skip_crowded: bool = True  # rows auto, with an index: leave out crowded heads (locate.py)
    weigh_rows: bool = True  # rows more facts touch, and with an index rows the corpus reads
    # more, move less (costs.py)
    sharer_contexts: int = 1  # distill, with an index: locality prompts per fact that end
    # with one of its top sharers (sharing.py; 0: none). README "Shared rows" has the numbers.
    fit_rephrase_prompts: bool = True  # distill: the fact file's rephrase prompts are solved
    # too (a fact is solved when its prompt and each of them is)
    heldout_windows: int = 32  # held-out windows of the heldout_loss metric
    heldout_tokens: int = 128  # tokens per metric window

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["method"], d["rows"] = self.method.value, self.rows.value
        if self.method is Method.DISTILL:
            d.pop("overwrite")
        else:
            d.pop("distill")
        return d


@dataclass
class EditProgress:
    stage: str  # "measure before", "sharer contexts", "distill", "overwrite", "measure after"
    batch: int = 0
    batches: int = 0
    step: int = 0
    done: int = 0  # facts of the batch whose target wins
    facts: int = 0


@dataclass
class UnsolvedFact:
    """Why a fact was left short of its goal, as far as the rows tell."""

    index: int  # in the fact list
    lead: float  # after the edit: least margin (nats) of a target token over the runner-up,
    # over the prompt and the wordings fitted with it; the goal asks for ``says_margin``
    rows: int  # rows the fact may change
    rows_at_bound: int  # of those, rows the norm bound holds back
    shares_rows_with: int  # other facts of the file that change some of the same rows


@dataclass
class EditReport:
    """What ``edit_facts`` made: the patch, and how the model fares before and after it."""

    patch: Patch
    facts: int
    rows_touched: int
    seconds: float  # computing the rows and the patch; measuring is not counted
    before: FactMetrics | None
    after: FactMetrics | None
    unsolved: list[int]  # indices of facts that did not reach the method's stop criterion
    sharing: list[FactSharing] | None = None  # per fact, with an index: rows and their sharers
    notes: list[str] = field(default_factory=list)  # what could not be done, and why
    unsolved_facts: list[UnsolvedFact] = field(default_factory=list)  # distill: per unsolved

    @property
    def edits_per_s(self) -> float:
        return self.facts / self.seconds if self.seconds > 0 else float("inf")


def load_patch_rows(model: EngramModel, patch: Patch, side: str = "after") -> None:
    """Put a patch's ``side`` rows ("after" or "before"), decoded, into the model's tables in
    memory. The files are not touched (journal.apply_patch writes them)."""
    with torch.no_grad():
        for e in patch.edits:
            raw = e.after if side == "after" else e.before
            w = model.engram(e.layer_id).embed.weight
            rows = torch.from_numpy(e.rows).to(w.device)
            w[rows] = torch.from_numpy(raw.values()).to(w.device, w.dtype)


@dataclass
class FactsMeasurement:
    facts: int
    metrics_version: int
    memory: FactMetrics
    no_memory: FactMetrics | None  # every Engram module off; the reference is memory on


def measure_facts(model: EngramModel, tokenizer: EngramTokenizer, facts: list[Fact],
                  heldout: np.ndarray | None = None, settings: EditSettings | None = None,
                  ablate: bool = False) -> FactsMeasurement:
    """The metric set for the model as it is (``eval FACTS``): the same held-out windows as
    ``edit_facts`` measures, and the model itself as the neighbours' reference.

    Returns:
        `FactsMeasurement`: with ``ablate``, also the metrics with the memory off.
    """
    settings = settings or EditSettings()
    measured, _ = _split_heldout(heldout)
    windows = (heldout_windows(measured, settings.heldout_windows, settings.heldout_tokens)
               if measured is not None else None)
    reference = neighbour_reference(model, tokenizer, facts)
    on = fact_metrics(model, tokenizer, facts, reference, windows)
    off = (fact_metrics(model, tokenizer, facts, reference, windows, memory=False)
           if ablate else None)
    return FactsMeasurement(len(facts), METRICS_VERSION, on, off)


def _split_heldout(stream: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The first half of the held-out stream is measured, the second half is the distill
    locality sample: the metric never scores text the edit was fitted to."""
    if stream is None:
        return None, None
    half = len(stream) // 2
    return stream[:half], stream[half:]


def applied_facts(files: ModelFiles) -> list[Fact]:
    """The facts of every patch applied to ``files`` (from the copies in ``.engram/``), oldest
    first; patches made without facts (overwrite NGRAM) add none."""
    from engram_edit.edit.journal import history
    from engram_edit.edit.store import engram_dir, load_copy

    out = []
    for entry in history(files):
        if not entry.applied:
            continue
        for d in load_copy(engram_dir(files), entry).metadata.get("facts", []):
            out.append(Fact(d["prompt"], d["subject"], d["target_new"], d.get("ground_truth"),
                            list(d.get("rephrase_prompt") or []),
                            list(d.get("locality_prompt") or []),
                            list(d.get("locality_ground_truth") or []),
                            list(d.get("portability_prompt") or []),
                            list(d.get("portability_ground_truth") or [])))
    return out


def _wordings(fact: Fact, settings: EditSettings) -> list[str]:
    """The prompts distill fits for a fact: its prompt, then (``fit_rephrase_prompts``) the
    file's rephrase prompts that hold the subject."""
    extra = ([t for t in fact.rephrase_prompts if fact.subject in t]
             if settings.fit_rephrase_prompts else [])
    return [fact.prompt] + extra


def _phrasings(facts: list[Fact], tokens: list[FactTokens], settings: EditSettings,
               tok: EngramTokenizer) -> tuple[list[FactTokens], list[int]]:
    """Every wording distill fits (``_wordings``), fact by fact, tokenized; with the fact each
    belongs to."""
    seqs, owner = [], []
    for k, (f, t) in enumerate(zip(facts, tokens, strict=True)):
        for j, text in enumerate(_wordings(f, settings)):
            seqs.append(t if j == 0 else tokenize_fact(replace(f, prompt=text), tok))
            owner.append(k)
    return seqs, owner


def _unsolved_facts(model: EngramModel, tok: EngramTokenizer, facts: list[Fact],
                    unsolved: list[int], settings: EditSettings, fact_rows: list[FactRows],
                    patch: Patch) -> list[UnsolvedFact]:
    """The margin each unsolved fact reached with the patch in place, and what held it: rows
    at their norm bound, rows other facts also change."""
    if not unsolved:
        return []
    bounds = layer_norm_bounds(model, settings.distill.norm_bound)
    wordings = [(k, replace(facts[k], prompt=text)) for k in unsolved
                for text in _wordings(facts[k], settings)]
    load_patch_rows(model, patch, "after")
    try:
        leads = target_leads(model, tok, [f for _, f in wordings])
        norms = {e.layer_id: (e.rows, np.linalg.norm(e.after.values(), axis=1))
                 for e in patch.edits}
    finally:
        load_patch_rows(model, patch, "before")
    out = []
    for k in unsolved:
        lead = min(float(x) for (j, _), x in zip(wordings, leads, strict=True) if j == k)
        held = 0
        for lid, mine in fact_rows[k].rows.items():
            rows, norm = norms.get(lid, (np.zeros(0, dtype=np.int64), np.zeros(0)))
            held += int((norm[np.isin(rows, mine)] >= 0.99 * bounds[lid]).sum())
        shared = sum(any(np.intersect1d(fact_rows[k].rows[lid], fact_rows[j].rows[lid]).size
                         for lid in fact_rows[k].rows) for j in range(len(facts)) if j != k)
        out.append(UnsolvedFact(k, lead, fact_rows[k].count, held, shared))
    return out


def _firsts(owner: list[int]) -> list[bool]:
    """Whether each entry is the first of its owner (a fact's prompt comes first)."""
    return [j == 0 or owner[j - 1] != o for j, o in enumerate(owner)]


def _union(rows: list[FactRows]) -> FactRows:
    """The rows of several wordings of one fact, as one fact's rows."""
    return FactRows({lid: np.unique(np.concatenate([r.rows[lid] for r in rows]))
                     for lid in rows[0].rows}, sum(r.left_out for r in rows))


def edit_facts(files: ModelFiles, model: EngramModel, facts: list[Fact],
               settings: EditSettings | None = None, heldout: np.ndarray | None = None,
               index: NgramIndex | None = None,
               progress: Callable[[EditProgress], None] | None = None,
               keep: list[Fact] | None = None,
               corpus: Sequence[str | Path] | None = None) -> EditReport:
    """The patch that makes ``model`` give each fact's target, with its metrics.

    Args:
        files (`ModelFiles`): the model's files (tokenizer, hashing, table for before-rows).
        model (`EngramModel`): the same model built with its tables inside (placement gpu).
        facts (`list[Fact]`): from ``facts.read_facts``.
        settings (`EditSettings`, optional): method, rows, method settings, measuring.
        heldout (`np.ndarray`, optional): a held-out token stream; its first half is the
            ``heldout_loss`` sample, its second half distill's locality sample.
        index (`NgramIndex`, optional): the corpus n-gram index. ``--rows auto`` then adds
            rare final n-grams and leaves out crowded heads; with ``weigh_rows`` the row costs
            count the corpus's reads too; the report lists each fact's sharers; distill
            adds ``sharer_contexts`` locality prompts per fact.
        progress (`Callable[[EditProgress], None]`, optional): called as work proceeds.
        keep (`list[Fact]`, optional): facts edited before (``applied_facts``) that distill
            keeps solved where they share a row with these; one with the prompt of a new fact
            is dropped (the new target replaces it).
        corpus (`Sequence[str | Path]`, optional): text the sharer locality prompts are cut
            from; default: the index's own corpus files, and none (with a note in the report)
            when they are gone.

    Returns:
        `EditReport`: the patch (metadata: facts, method, settings, metrics with
        ``metrics_version``, tool version, fingerprint, created, and with an index the
        ``sharing`` of each fact), timing, metrics, sharing and notes.

    Example:
        >>> files, model = load_model("model", placement="gpu")  # doctest: +SKIP
        >>> report = edit_facts(files, model, read_facts("facts.jsonl"))
        >>> report.after.efficacy
        1.0
    """
    settings = settings or EditSettings()
    tell = progress or (lambda p: None)
    measured, fitted = _split_heldout(heldout)
    windows = (heldout_windows(measured, settings.heldout_windows, settings.heldout_tokens)
               if measured is not None else None)
    tok = files.tokenizer
    before = reference = None
    if settings.measure:
        tell(EditProgress("measure before"))
        reference = neighbour_reference(model, tok, facts)
        before = fact_metrics(model, tok, facts, reference, windows)
    start = time.perf_counter()
    tokens = [tokenize_fact(f, tok) for f in facts]
    count = None if index is None else index.ngram_count
    crowding = settings.skip_crowded and settings.rows is RowChoice.AUTO
    occurrences = ({lid: index.slot_loads(lid)[1] for lid in files.hasher.layer_ids}
                   if index is not None and (crowding or settings.weigh_rows) else None)
    loads = occurrences if crowding else None

    def locate(t: FactTokens) -> FactRows:
        return locate_rows(t, tok, files.hasher, settings.rows, count, loads)

    fact_rows = [locate(t) for t in tokens]
    reads = read_costs(occurrences) if occurrences is not None and settings.weigh_rows else None
    sharing = None if index is None else facts_sharing(index, tokens, fact_rows)
    notes = []
    if settings.method is Method.DISTILL:
        def on_step(p: DistillProgress) -> None:
            tell(EditProgress("distill", p.batch, p.batches, p.step, p.done, p.facts))

        edited = {f.prompt for f in facts}  # a neighbour being edited is no neighbour
        locality = [[tok.encode(p) for p in f.locality_prompts if p not in edited]
                    for f in facts]
        if sharing is not None and settings.sharer_contexts > 0:
            source = corpus_of(index) if corpus is None else corpus
            if source:
                tell(EditProgress("sharer contexts"))
                extra = sharer_prompts(index, sharing, settings.sharer_contexts, source)
                locality = [a + b for a, b in zip(locality, extra, strict=True)]
            else:
                notes.append(f"no sharer contexts in the locality term: the index's corpus "
                             f"({', '.join(s.path for s in index.info.sources)}) is not "
                             f"there; pass the corpus files to use")
        kept = [tokenize_fact(f, tok) for f in keep or [] if f.prompt not in edited]
        kept_rows = [locate(t) for t in kept]
        seqs, owner = _phrasings(facts, tokens, settings, tok)
        located: list[list[FactRows]] = [[] for _ in facts]
        for k, t in zip(owner, seqs, strict=True):
            located[k].append(locate(t))
        fact_rows = [_union(r) for r in located]
        costs = (RowCosts.of_facts(fact_rows + kept_rows, reads) if settings.weigh_rows
                 else None)
        result = distill(model, seqs, [fact_rows[i] for i in owner],
                         [locality[i] if first else [] for i, first in
                          zip(owner, _firsts(owner), strict=True)],
                         settings.distill, fitted, on_step,
                         list(zip(kept, kept_rows, strict=True)), costs)
        values = result.values
        unsolved = sorted({owner[j] for j in result.undone})
    else:
        tell(EditProgress("overwrite", 1, 1, 0, 0, len(facts)))
        truths = [tok.encode(f.truth) if f.truth is not None else None for f in facts]
        costs = RowCosts.of_facts(fact_rows, reads) if settings.weigh_rows else None
        values = closed_form(model, tokens, truths, fact_rows, settings.overwrite, costs)
        unsolved = []
    with files.table() as table:
        patch = rows_patch(table, files.fingerprint(), values)
    detail = (_unsolved_facts(model, tok, facts, unsolved, settings, fact_rows, patch)
              if settings.method is Method.DISTILL else [])
    seconds = time.perf_counter() - start
    after = None
    if settings.measure:
        tell(EditProgress("measure after"))
        load_patch_rows(model, patch, "after")
        try:
            after = fact_metrics(model, tok, facts, reference, windows)
        finally:
            load_patch_rows(model, patch, "before")
    patch.metadata = {
        "facts": [f.to_dict() for f in facts],
        "method": settings.method.value,
        "settings": settings.to_dict(),
        "metrics": {"metrics_version": METRICS_VERSION,
                    "before": before and asdict(before), "after": after and asdict(after)},
        "seconds": seconds,
        "unsolved": unsolved,
        **({} if sharing is None else {"sharing": [s.to_dict() for s in sharing]}),
        "version": tool_version(),
        "fingerprint": files.fingerprint(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return EditReport(patch, len(facts), patch.rows_touched, seconds, before, after, unsolved,
                      sharing, notes, detail)
