"""distill: optimize only the table rows a batch of facts touches, the model frozen, until each
fact's prompt continues with its target; a KL term keeps neighbours and held-out text as the
unedited model had them, and a norm bound keeps rows in range.

Which rows is locate.py's; the frozen forward frozen.py's; quantizing the result and building
the Patch compute.py's. The table on disk is never touched here, and the model is left exactly
as it was given.

Cost is what the bar is about, so a step only runs what can still change: a fact that reaches
the stop criterion leaves the batch and its rows freeze (Adam steps only the rows of unsolved
facts), and a solved fact, a neighbour prompt or a held-out window stays in the forward pass
only while it reads a row that is still moving. The unedited model's distributions for the KL
term are computed once, for the neighbours of facts the closed-form start left unsolved (and of
any that a later check finds broken).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engram_edit.edit.costs import RowCosts
from engram_edit.edit.frozen import DeltaEmbedding, ScoredBatch, substituted_rows
from engram_edit.edit.locate import FactRows, FactTokens, group_facts
from engram_edit.edit.overwrite import (
    OverwriteSettings,
    clip_rows,
    closed_form,
    layer_norm_bounds,
)
from engram_edit.model import EngramModel


@dataclass
class DistillSettings:
    steps: int = 30  # Adam steps at most per batch of facts
    lr: float = 0.1  # Adam step size, in row units (trained rows have norm ~1-2)
    adam_eps: float = 1e-8  # Adam's eps; near typical gradients, rows that barely matter move less
    batch_facts: int = 256  # sequences (a fact's prompt and each of its phrasings) together
    goal: str = "says"  # when a fact is solved: "says" or "prefers" (``GOALS``)
    says_margin: float = 1.0  # says: every target token beats the runner-up by this (nats)
    margin: float = 1.0  # prefers: log P(target) >= log P(ground truth) + this (nats) ...
    keep_margin: float = 0.0  # ... and a kept fact of an earlier batch is intact at this
    stop_prob: float = 0.6  # ... or, without a ground truth, P(target) >= this, greedy
    locality_weight: float = 1.0  # weight of the KL to the unedited model
    heldout_windows: int = 8  # held-out windows in the locality term (0: none)
    heldout_tokens: int = 32  # tokens per held-out window
    norm_bound: float = 2.0  # an edited row's norm stays <= this x the layer's 99th percentile
    check_every: int = 15  # steps between checks of every fact (solved ones may be moved back)
    seed: int = 0  # picks the held-out windows
    warm_start: bool = True  # start from overwrite's closed form (one pass) instead of zero
    warm_margin: float = 3.0  # the margin the closed form aims at


GOALS = {
    "says": "greedy decoding gives the whole target: under teacher forcing every target token "
            "is the top-1 by at least says_margin nats over the runner-up (a kept fact: is "
            "still the top-1)",
    "prefers": "log P(target) beats log P(ground truth) by margin nats (CounterFact's "
               "efficacy criterion); without a ground truth, P(target) >= stop_prob and greedy "
               "decoding gives it",
}


@dataclass
class DistillProgress:
    batch: int  # 1-based
    batches: int
    step: int
    done: int  # facts of this batch that are solved
    facts: int  # facts in this batch


@dataclass
class DistillResult:
    values: dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (sorted rows, float32 rows)
    steps: list[int]  # Adam steps taken per batch
    undone: list[int]  # indices of facts that did not reach the stop criterion


class _RowAdam:
    """Adam on ``[rows, width]`` tensors that steps only the rows it is told are moving
    (each row keeps its own step count for the bias correction), each row with its own step
    size (``lr``: a ``[rows, 1]`` tensor per parameter)."""

    def __init__(self, params: dict[int, torch.Tensor], lr: dict[int, torch.Tensor],
                 betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}
        self.t = {k: torch.zeros(len(p), 1, device=p.device) for k, p in params.items()}

    @torch.no_grad()
    def step(self, moving: dict[int, torch.Tensor]) -> None:
        b1, b2 = self.betas
        for k, p in self.params.items():
            if p.grad is None or not moving[k].any():
                continue
            rows = moving[k]
            g = p.grad[rows]
            self.t[k][rows] += 1
            self.m[k][rows] = b1 * self.m[k][rows] + (1 - b1) * g
            self.v[k][rows] = b2 * self.v[k][rows] + (1 - b2) * g * g
            t = self.t[k][rows]
            m_hat = self.m[k][rows] / (1 - b1 ** t)
            v_hat = self.v[k][rows] / (1 - b2 ** t)
            p[rows] -= self.lr[k][rows] * m_hat / (v_hat.sqrt() + self.eps)


class _Sequences:
    """Sequences with scored positions, and which touched rows each one reads."""

    def __init__(self, model: EngramModel, seqs: list[list[int]], scored: list[list[int]],
                 touched: dict[int, torch.Tensor]) -> None:
        self.model, self.seqs, self.scored = model, seqs, scored
        self._cache: tuple[bytes, ScoredBatch] | None = None
        self.reads: dict[int, torch.Tensor] = {}  # layer -> bool [n, touched rows]
        if not seqs:
            return
        probe = ScoredBatch.build(model, seqs, scored)
        for lid, t in touched.items():
            r = probe.rows[lid].flatten(1)  # [n, T*C]
            pos = torch.searchsorted(t, r).clamp_max(max(len(t) - 1, 0))
            hit = t[pos] == r if len(t) else torch.zeros_like(r, dtype=torch.bool)
            m = torch.zeros(len(seqs), len(t), dtype=torch.bool, device=r.device)
            m[torch.nonzero(hit, as_tuple=True)[0], pos[hit]] = True
            self.reads[lid] = m

    def __len__(self) -> int:
        return len(self.seqs)

    def reading(self, moving: dict[int, torch.Tensor]) -> torch.Tensor:
        """bool ``[n]``: sequences that read a moving row (only those can change)."""
        out = torch.zeros(len(self.seqs), dtype=torch.bool)
        for lid, m in self.reads.items():
            out |= (m & moving[lid]).any(1).cpu()
        return out

    def batch(self, select: torch.Tensor) -> ScoredBatch:
        """The ScoredBatch of the selected sequences (rebuilt only when the selection
        changes); positions in order of the selected sequences."""
        key = select.numpy().tobytes()
        if self._cache is None or self._cache[0] != key:
            idx = torch.nonzero(select).flatten().tolist()
            self._cache = (key, ScoredBatch.build(self.model, [self.seqs[i] for i in idx],
                                                  [self.scored[i] for i in idx]))
        return self._cache[1]


class _Locality:
    """KL(unedited || edited) on the next-token distributions of neighbour prompts (at their
    last token) and of held-out windows (every position); the unedited side is computed once,
    when a fact first needs it.

    Every other step uses, for each fact still being solved, one of its neighbours in turn
    (weighted by 2), and every step a quarter of the windows in turn (weighted by 4), so that
    the term's expectation is the whole sample's; of those, only the ones that read a row that
    is still moving, since no other can change."""

    NEIGHBOUR_EVERY = 2
    WINDOW_TURNS = 4

    def __init__(self, prompts: list[list[int]], owners: list[int],
                 windows: list[list[int]]) -> None:
        self.seqs = prompts + windows
        self.scored = [[len(s) - 1] for s in prompts] + [list(range(len(w))) for w in windows]
        self.owner = torch.tensor(owners + [-1] * len(windows), dtype=torch.long)
        turn = [sum(o == owners[i] for o in owners[:i]) for i in range(len(owners))]
        count = [owners.count(o) for o in owners]
        turns = min(self.WINDOW_TURNS, len(windows)) or 1
        self.turn = torch.tensor(turn + [i % turns for i in range(len(windows))],
                                 dtype=torch.long)
        self.count = torch.tensor(count + [turns] * len(windows), dtype=torch.long)
        self.weight = ([float(self.NEIGHBOUR_EVERY)] * len(prompts)
                       + [float(turns)] * len(windows))
        self.reference: list[torch.Tensor | None] = [None] * len(self.seqs)

    def __len__(self) -> int:
        return len(self.seqs)

    def compute_reference(self, model: EngramModel, seqs: _Sequences, first: int,
                          facts: torch.Tensor) -> None:
        """The unedited distributions of the windows and of the neighbours of the facts marked
        in ``facts`` (bool, CPU), those not computed yet, with the rows as the model reads them
        now (the sequences are ``seqs``'s from index ``first`` on)."""
        wanted = (self.owner < 0) | facts[self.owner.clamp_min(0)]  # windows, and neighbours
        missing = wanted & torch.tensor([r is None for r in self.reference], dtype=torch.bool)
        if not missing.any():
            return
        select = torch.zeros(len(seqs), dtype=torch.bool)
        select[first:] = missing
        with torch.no_grad():
            logp = seqs.batch(select).log_probs(model)
        chosen = torch.nonzero(missing).flatten().tolist()
        for i, lp in zip(chosen, logp.split([len(self.scored[i]) for i in chosen]), strict=True):
            self.reference[i] = lp

    def select(self, active: torch.Tensor, reading: torch.Tensor, step: int) -> torch.Tensor:
        """bool ``[len(self)]``: this step's prompts and windows, for the facts marked in
        ``active`` (bool, CPU) while the sequences marked in ``reading`` read a moving row."""
        neighbour = self.owner >= 0
        chosen = self.turn == step % self.count
        every = self.NEIGHBOUR_EVERY
        chosen[neighbour] = ((self.turn[neighbour] == step // every % self.count[neighbour])
                             & active[self.owner[neighbour]] & (step % every == 0))
        return chosen & reading

    def kl(self, logp: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """The KL term of the selected sequences from their log-probs ``logp`` (in order): a
        sum with one weighted unit per prompt or window (its positions averaged)."""
        chosen = torch.nonzero(select).flatten().tolist()
        ref = torch.cat([self.reference[i] for i in chosen])
        kl = (ref.exp() * (ref - logp)).sum(-1)
        weight = torch.cat([torch.full((len(self.reference[i]),),
                                       self.weight[i] / len(self.reference[i]))
                            for i in chosen]).to(kl.device)
        return (kl * weight).sum()


def _heldout_windows(stream: np.ndarray | None, settings: DistillSettings) -> list[list[int]]:
    if stream is None or settings.heldout_windows == 0:
        return []
    n = settings.heldout_tokens
    usable = len(stream) - n
    if usable <= 0:
        return []
    rng = np.random.default_rng(settings.seed)
    starts = np.sort(rng.choice(usable, size=min(settings.heldout_windows, usable),
                                replace=False))
    return [np.asarray(stream[s:s + n], dtype=np.int64).tolist() for s in starts]


def _owned(fact_rows: list[FactRows], touched: dict[int, torch.Tensor], n: int
           ) -> dict[int, torch.Tensor]:
    """layer -> bool ``[n facts, touched rows]``: the rows each fact's edit may move."""
    out = {}
    for lid, t in touched.items():
        m = torch.zeros(n, len(t), dtype=torch.bool, device=t.device)
        for i, fr in enumerate(fact_rows):
            pos = torch.searchsorted(t, torch.from_numpy(fr.rows[lid]).to(t.device))
            m[i, pos] = True
        out[lid] = m
    return out


def _truth_rest(model: EngramModel, facts: list[FactTokens]) -> torch.Tensor:
    """log P of each fact's ground truth tokens after the first (teacher forced) with the
    current rows: 0 for a one-token truth, NaN for a fact without one. The first token's is in
    the target's own forward pass, at the same position."""
    device = next(model.parameters()).device
    rest = torch.tensor([0.0 if t.truth else float("nan") for t in facts], device=device)
    longer = [i for i, t in enumerate(facts) if t.truth and len(t.truth) > 1]
    if not longer:
        return rest
    seqs = [(facts[i].prompt + facts[i].truth)[:-1] for i in longer]
    scored = [list(range(len(facts[i].prompt), len(s))) for i, s in zip(longer, seqs,
                                                                         strict=True)]
    with torch.no_grad():
        logp = ScoredBatch.build(model, seqs, scored).log_probs(model)
    gold = torch.tensor([x for i in longer for x in facts[i].truth[1:]], device=device)
    owner = torch.repeat_interleave(torch.arange(len(longer), device=device), torch.tensor(
        [len(facts[i].truth) - 1 for i in longer], device=device))
    rest[longer] = torch.zeros(len(longer), device=device).index_add(
        0, owner, logp.gather(1, gold[:, None]).squeeze(1))
    return rest


class _Truths:
    """log P(ground truth) per fact of a batch: its first token from the target's own forward
    pass (the same position), the rest from a pass of the truths (multi-token truths only). The
    rest drifts as the subject's rows change; it is redone when a fact may be solved, and the
    last value otherwise only picks which facts get that pass."""

    def __init__(self, model: EngramModel, facts: list[FactTokens]) -> None:
        """Each rest is first computed at a check, the only way a fact enters a step."""
        device = next(model.parameters()).device
        self.facts = facts
        self.token = torch.tensor([t.truth[0] if t.truth else 0 for t in facts], device=device)
        self.rest = torch.full((len(facts),), float("nan"), device=device)

    def __call__(self, model: EngramModel, idx: list[int], first_logp: torch.Tensor,
                 exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """log P(truth) of the facts ``idx``, and whether each rest was redone now (bool,
        CPU); ``first_logp`` ``[len(idx), vocab]``: log-probs after each prompt. ``exact`` (or
        a fact whose rest is not known yet) redoes the rest."""
        redo = [i for i in idx if self.facts[i].truth and (exact or bool(self.rest[i].isnan()))]
        if redo:
            self.rest[redo] = _truth_rest(model, [self.facts[i] for i in redo])
        first = first_logp.gather(1, self.token[idx][:, None]).squeeze(1)
        fresh = set(redo)
        return first + self.rest[idx], torch.tensor([i in fresh for i in idx], dtype=torch.bool)


def _scores(model: EngramModel, logp: torch.Tensor, idx: list[int], gold: list[torch.Tensor],
            truths: _Truths, margins: torch.Tensor, settings: DistillSettings,
            exact: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the facts ``idx``, from the log-probs ``logp`` at their target positions (in order):
    log P(target) (differentiable), target length, and solved (CPU bool) as ``settings.goal``
    says (``GOALS``), with the fact's margin (``margins``)."""
    device = logp.device
    margin = margins[idx]
    gold_sel = torch.cat([gold[i] for i in idx])
    lengths = torch.tensor([len(gold[i]) for i in idx], device=device)
    owner = torch.repeat_interleave(torch.arange(len(idx), device=device), lengths)
    token_lp = logp.gather(1, gold_sel[:, None]).squeeze(1)
    lp = torch.zeros(len(idx), device=device).index_add(0, owner, token_lp)
    if settings.goal == "says":
        runner_up = logp.detach().scatter(1, gold_sel[:, None], float("-inf")).amax(-1)
        lead = torch.full((len(idx),), float("inf"), device=device).scatter_reduce(
            0, owner, token_lp.detach() - runner_up, reduce="amin")
        return lp, lengths.float(), (lead >= margin).cpu()
    wrong = torch.zeros(len(idx), device=device).index_add(
        0, owner, (logp.argmax(-1) != gold_sel).float())
    first = logp.detach()[torch.cumsum(lengths, 0) - lengths]
    truth, fresh = truths(model, idx, first, exact)
    # a fact the estimate calls solved is confirmed with its truth's own pass
    sure = torch.nonzero((lp.detach() >= truth + margin).cpu() & ~fresh).flatten().tolist()
    if sure:
        truth[sure] = truths(model, [idx[i] for i in sure], first[sure], exact=True)[0]
    by_margin = lp.detach() >= truth + margin
    by_prob = (lp.detach() >= float(np.log(settings.stop_prob))) & (wrong == 0)
    return lp, lengths.float(), torch.where(truth.isnan(), by_prob, by_margin).cpu()


def _solve_batch(model: EngramModel, tokens: list[FactTokens], rows: list[FactRows],
                 keep: list[FactTokens], touched: dict[int, torch.Tensor],
                 locality: _Locality, bounds: dict[int, float], settings: DistillSettings,
                 report: Callable[[int, int], None],
                 start: dict[int, torch.Tensor] | None = None,
                 row_cost: RowCosts | None = None
                 ) -> tuple[dict[int, torch.Tensor], int, list[bool]]:
    """Deltas on ``touched`` rows that solve ``tokens`` (and keep ``keep`` solved); ``rows``:
    the FactRows of both, a kept fact being repaired through its own rows.

    One forward pass a step holds the facts being solved and the locality sequences chosen for
    the step (``_Sequences`` indices: the facts, then ``locality``'s)."""
    facts = tokens + keep
    n = len(facts)
    device = next(model.parameters()).device
    seqs = _Sequences(model, [t.sequence[:-1] for t in facts] + locality.seqs,
                      [list(t.predicting) for t in facts] + locality.scored, touched)
    owned = _owned(rows, touched, n)
    gold = [torch.tensor(t.target, device=device) for t in facts]
    truths = _Truths(model, facts)
    first_margin = settings.says_margin if settings.goal == "says" else settings.margin
    margins = torch.tensor([first_margin] * len(tokens) + [settings.keep_margin] * len(keep),
                           device=device)
    weights = {lid: model.engram(lid).embed.weight.detach()[t] for lid, t in touched.items()}
    deltas = {lid: (start[lid].clone() if start else torch.zeros_like(w)).requires_grad_(True)
              for lid, w in weights.items()}
    checked = {lid: torch.zeros_like(w) for lid, w in weights.items()}  # deltas at the check
    cost = {lid: torch.ones(len(t), 1) if row_cost is None else
            torch.from_numpy(row_cost(lid, t.cpu().numpy())).float()[:, None]
            for lid, t in touched.items()}
    adam = _RowAdam(deltas, {lid: (settings.lr / c).to(device) for lid, c in cost.items()},
                    eps=settings.adam_eps)
    # a fact whose sequence reads none of the rows the batch may move cannot be helped
    movable = seqs.reading({lid: m.any(0) for lid, m in owned.items()})[:n]
    unsolved = torch.zeros(n, dtype=torch.bool)
    unsolved[:len(tokens)] = True  # kept facts start solved
    active = unsolved & movable  # the facts in the forward pass of the next step
    no_locality = torch.zeros(len(locality), dtype=torch.bool)
    step, since_check = 0, settings.check_every  # the first round starts with a check
    limit = settings.steps
    unedited = {lid: model.engram(lid).embed for lid in touched}
    lookups = {lid: DeltaEmbedding(unedited[lid], touched[lid], deltas[lid]) for lid in touched}
    with substituted_rows(model, lookups):
        while True:
            final = not active.any() or step >= limit
            if final or since_check >= settings.check_every:
                # what was not solved at the last check, and what reads a row moved since
                check = unsolved | seqs.reading({lid: (d != checked[lid]).any(1)
                                                 for lid, d in deltas.items()})[:n]
                idx = torch.nonzero(check).flatten().tolist()
                if idx:
                    with torch.no_grad():
                        logp = seqs.batch(torch.cat([check, no_locality])).log_probs(model)
                        ok = _scores(model, logp, idx, gold, truths, margins, settings,
                                     exact=final)[2]
                    unsolved[check] = ~ok
                checked = {lid: d.detach().clone() for lid, d in deltas.items()}
                active, since_check = unsolved & movable, 0
                with substituted_rows(model, unedited):  # the KL term's reference, once each
                    locality.compute_reference(model, seqs, n, active)
                report(step, int((~unsolved[:len(tokens)]).sum()))
                if not active.any():
                    break
                if step >= limit:  # out of steps: one short round more if a kept fact broke
                    if limit > settings.steps or not active[len(tokens):].any():
                        break
                    limit += max(1, settings.steps // 4)
            moving = {lid: m[active.to(m.device)].any(0) for lid, m in owned.items()}
            near = (locality.select(active, seqs.reading(moving)[n:], step)
                    if settings.locality_weight > 0 else no_locality)
            idx = torch.nonzero(active).flatten()
            logp = seqs.batch(torch.cat([active, near])).log_probs(model)
            split = sum(len(gold[i]) for i in idx.tolist())
            lp, n_tokens, ok = _scores(model, logp[:split], idx.tolist(), gold, truths, margins,
                                       settings)
            failing = (~ok).to(device=device, dtype=torch.float32)
            loss = -(lp / n_tokens * failing).sum()  # a sum: each fact's gradient is its own
            active[idx[ok]] = False  # solved: out of the batch, its rows freeze
            if not active.any():
                continue
            if near.any():
                loss = loss + settings.locality_weight * locality.kl(logp[split:], near)
            for d in deltas.values():
                d.grad = None
            loss.backward()
            adam.step({lid: m[active.to(m.device)].any(0) for lid, m in owned.items()})
            step += 1
            since_check += 1
            with torch.no_grad():
                for lid, d in deltas.items():
                    d.copy_(clip_rows(weights[lid] + d, bounds[lid]) - weights[lid])
    return ({lid: d.detach() for lid, d in deltas.items()}, step,
            (~unsolved[:len(tokens)]).tolist())


def _rows_read(model: EngramModel, tokens: list[FactTokens]) -> list[dict[int, np.ndarray]]:
    """Per fact and Engram layer, every row its teacher-forced sequence reads."""
    out = []
    for t in tokens:
        ids = torch.tensor([t.sequence[:-1]], device=next(model.parameters()).device)
        out.append({lid: np.unique(r.cpu().numpy())
                    for lid, r in model.compute_rows(ids).items()})
    return out


def _warm_start(model: EngramModel, tokens: list[FactTokens], rows: list[FactRows],
                touched: dict[int, torch.Tensor], settings: DistillSettings,
                row_cost: RowCosts | None = None) -> dict[int, torch.Tensor]:
    """Deltas on ``touched`` from overwrite's closed form: one linearized solve that puts
    most facts at or near their margin before the first Adam step."""
    values = closed_form(model, tokens, [t.truth for t in tokens], rows,
                         OverwriteSettings(margin=settings.warm_margin,
                                           norm_bound=settings.norm_bound), row_cost)
    out = {}
    for lid, (r, v) in values.items():
        t = touched[lid]
        w = model.engram(lid).embed.weight.detach()
        out[lid] = torch.zeros(len(t), w.shape[1], device=t.device)
        r = torch.from_numpy(r).to(t.device)
        out[lid][torch.searchsorted(t, r)] = torch.from_numpy(v).to(t.device) - w[r]
    return out


def distill(model: EngramModel, tokens: list[FactTokens], fact_rows: list[FactRows],
            locality: list[list[list[int]]], settings: DistillSettings,
            heldout: np.ndarray | None = None,
            progress: Callable[[DistillProgress], None] | None = None,
            keep: list[tuple[FactTokens, FactRows]] = (),
            row_cost: RowCosts | None = None) -> DistillResult:
    """New values of every touched row, batch by batch.

    Each batch optimizes the deltas of its facts' rows with Adam so that every fact's target
    (all its tokens, teacher forced) reaches ``stop_prob`` with greedy decoding giving it,
    with KL to the unedited model on the batch's neighbour prompts and a held-out sample as
    the locality term, and each edited row's norm projected back under the layer's bound.
    Facts of earlier batches that read a row of this batch are kept solved. Edits of earlier
    batches are in place in the model while later ones are solved, and the model is restored
    before returning.

    Args:
        model (`EngramModel`): the model with its current rows (float32 in memory).
        tokens (`list[FactTokens]`): the facts, tokenized (locate.tokenize_fact).
        fact_rows (`list[FactRows]`): each fact's rows (locate.locate_rows).
        locality (`list[list[list[int]]]`): per fact, the token ids of its neighbour prompts.
        settings (`DistillSettings`): steps, learning rate, locality, norm bound, seed.
        heldout (`np.ndarray`, optional): a held-out token stream for the locality term.
        progress (`Callable[[DistillProgress], None]`, optional): called after every step.
        keep (`list[tuple[FactTokens, FactRows]]`, optional): facts to keep solved.
        row_cost (`RowCosts`, optional): the cost of changing each row (costs.py): the warm
            start minimizes the cost-weighted norm, and Adam's step on a row is ``lr / cost``.
            Its touch counts should cover ``keep`` too.

    Returns:
        `DistillResult`: per layer the sorted touched rows and their new float32 values.
    """
    bounds = layer_norm_bounds(model, settings.norm_bound)
    windows = _heldout_windows(heldout, settings)
    batches = group_facts(list(fact_rows), settings.batch_facts)
    layer_ids = model.config.engram_layer_ids
    device = next(model.parameters()).device
    originals: dict[int, dict[int, torch.Tensor]] = {lid: {} for lid in layer_ids}
    steps, undone = [], []
    tokens = list(tokens) + [t for t, _ in keep]
    fact_rows = list(fact_rows) + [r for _, r in keep]
    solved = list(range(len(tokens) - len(keep), len(tokens)))
    # which rows each fact reads, for facts of earlier batches and of ``keep``
    reads = _rows_read(model, tokens) if keep or len(batches) > 1 else []
    try:
        for k, batch in enumerate(batches):
            touched = {lid: torch.from_numpy(np.unique(np.concatenate(
                [fact_rows[i].rows[lid] for i in batch]))).to(device) for lid in layer_ids}
            use = settings.locality_weight > 0
            loc = _Locality([p for i in batch for p in locality[i]] if use else [],
                            [j for j, i in enumerate(batch) for _ in locality[i]] if use else [],
                            windows if use else [])

            def report(step: int, done: int, k: int = k, n: int = len(batch)) -> None:
                if progress is not None:
                    progress(DistillProgress(k + 1, len(batches), step, done, n))

            # earlier facts whose sequences read a row of this batch (their own rows, or any
            # other by a hash collision): kept solved, through their own rows
            shared = [i for i in solved if any(
                np.isin(reads[i][lid], touched[lid].cpu().numpy()).any() for lid in layer_ids)]
            if shared:
                touched = {lid: torch.from_numpy(np.unique(np.concatenate(
                    [fact_rows[i].rows[lid] for i in batch + shared]))).to(device)
                    for lid in layer_ids}
            start = _warm_start(model, [tokens[i] for i in batch], [fact_rows[i] for i in batch],
                                touched, settings, row_cost) if settings.warm_start else None
            deltas, n_steps, done = _solve_batch(
                model, [tokens[i] for i in batch], [fact_rows[i] for i in batch + shared],
                [tokens[i] for i in shared], touched, loc, bounds, settings, report, start,
                row_cost)
            steps.append(n_steps)
            undone += [i for i, ok in zip(batch, done, strict=True) if not ok]
            solved += [i for i, ok in zip(batch, done, strict=True) if ok]
            with torch.no_grad():
                for lid, d in deltas.items():
                    w = model.engram(lid).embed.weight
                    for r in touched[lid].tolist():
                        originals[lid].setdefault(r, w[r].clone())
                    w[touched[lid]] += d
        values = {}
        for lid in layer_ids:
            rows = np.array(sorted(originals[lid]), dtype=np.int64)
            w = model.engram(lid).embed.weight.detach()
            values[lid] = (rows, w[torch.from_numpy(rows).to(device)].float().cpu().numpy())
    finally:
        with torch.no_grad():
            for lid, saved in originals.items():
                w = model.engram(lid).embed.weight
                for r, v in saved.items():
                    w[r] = v
    return DistillResult(values, steps, sorted(undone))
