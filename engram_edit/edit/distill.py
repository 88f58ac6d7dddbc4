"""distill: optimize only the table rows a batch of facts touches, the model frozen, until each
fact's prompt continues with its target; a KL term keeps neighbours and held-out text as the
unedited model had them, and a norm bound keeps rows in range (issue 6 "Methods").

Which rows is locate.py's; the frozen forward frozen.py's; quantizing the result and building
the Patch compute.py's. The table on disk is never touched here, and the model is left exactly
as it was given.

Cost is what the bar is about, so a step only runs what can still change: a fact that reaches
the stop criterion leaves the batch and its rows freeze (Adam steps only the rows of unsolved
facts), and a solved fact, a neighbour prompt or a held-out window stays in the forward pass
only while it reads a row that is still moving. The unedited model's distributions for the KL
term are computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engram_edit.edit.frozen import DeltaEmbedding, ScoredBatch, substituted_rows
from engram_edit.edit.locate import FactRows, FactTokens, group_facts
from engram_edit.edit.overwrite import clip_rows, layer_norm_bounds
from engram_edit.model import EngramModel


@dataclass
class DistillSettings:
    steps: int = 40  # Adam steps at most per batch of facts
    lr: float = 0.1  # Adam step size, in row units (trained rows have norm ~1-2)
    adam_eps: float = 1e-8  # Adam's eps; near typical gradients, rows that barely matter move less
    batch_facts: int = 256  # facts optimized together
    margin: float = 1.0  # solved: log P(target) >= log P(ground truth) + this (nats) ...
    stop_prob: float = 0.6  # ... or, without a ground truth, P(target) >= this, greedy
    locality_weight: float = 1.0  # weight of the KL to the unedited model
    heldout_windows: int = 8  # held-out windows in the locality term (0: none)
    heldout_tokens: int = 32  # tokens per held-out window
    norm_bound: float = 2.0  # an edited row's norm stays <= this x the layer's 99th percentile
    check_every: int = 10  # steps between checks of every fact (solved ones may be moved back)
    seed: int = 0  # picks the held-out windows


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
    (each row keeps its own step count for the bias correction)."""

    def __init__(self, params: dict[int, torch.Tensor], lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8) -> None:
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
            p[rows] -= self.lr * m_hat / (v_hat.sqrt() + self.eps)


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
    last token) and of held-out windows (every position); the unedited side is computed once.
    A step uses every window and, for each fact still being solved, one of its neighbours in
    turn (all of them every few steps, at a third of the cost)."""

    def __init__(self, model: EngramModel, prompts: list[list[int]], owners: list[int],
                 windows: list[list[int]], touched: dict[int, torch.Tensor]) -> None:
        seqs = prompts + windows
        scored = [[len(s) - 1] for s in prompts] + [list(range(len(w))) for w in windows]
        self.owner = torch.tensor(owners + [-1] * len(windows), dtype=torch.long)
        turn = [sum(o == owners[i] for o in owners[:i]) for i in range(len(owners))]
        count = [owners.count(o) for o in owners]
        self.turn = torch.tensor(turn + [0] * len(windows), dtype=torch.long)
        self.count = torch.tensor(count + [1] * len(windows), dtype=torch.long)
        self.seqs = _Sequences(model, seqs, scored, touched)
        self.reference: list[torch.Tensor] = []
        if seqs:
            everything = torch.ones(len(seqs), dtype=torch.bool)
            with torch.no_grad():
                logp = self.seqs.batch(everything).log_probs(model)
            self.reference = list(logp.split([len(s) for s in scored]))

    def loss(self, model: EngramModel, active: torch.Tensor, step: int) -> torch.Tensor | None:
        """The KL term at ``step`` while the facts marked in ``active`` (bool, CPU) are being
        solved: a sum with one unit per prompt or window (its positions averaged)."""
        if not len(self.seqs):
            return None
        neighbour = self.owner >= 0
        select = ~neighbour
        select[neighbour] = (active[self.owner[neighbour]]
                             & (self.turn[neighbour] == step % self.count[neighbour]))
        if not select.any():
            return None
        chosen = torch.nonzero(select).flatten().tolist()
        logp = self.seqs.batch(select).log_probs(model)
        ref = torch.cat([self.reference[i] for i in chosen])
        kl = (ref.exp() * (ref - logp)).sum(-1)
        weight = torch.cat([torch.full((len(self.reference[i]),), 1 / len(self.reference[i]))
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
    """layer -> bool ``[n facts, touched rows]``: the rows each fact's edit may move (facts
    past ``len(fact_rows)`` are kept facts of earlier batches and own none)."""
    out = {}
    for lid, t in touched.items():
        m = torch.zeros(n, len(t), dtype=torch.bool, device=t.device)
        for i, fr in enumerate(fact_rows):
            pos = torch.searchsorted(t, torch.from_numpy(fr.rows[lid]).to(t.device))
            m[i, pos] = True
        out[lid] = m
    return out


def _truth_logprob(model: EngramModel, facts: list[FactTokens]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log P of each fact's ground truth after its prompt with the current rows: (its first
    token, the rest), NaN for a fact without one."""
    device = next(model.parameters()).device
    first = torch.full((len(facts),), float("nan"), device=device)
    rest = first.clone()
    has = [i for i, t in enumerate(facts) if t.truth]
    if not has:
        return first, rest
    seqs = [(facts[i].prompt + facts[i].truth)[:-1] for i in has]
    scored = [list(range(len(facts[i].prompt) - 1, len(s))) for i, s in zip(has, seqs,
                                                                             strict=True)]
    with torch.no_grad():
        logp = ScoredBatch.build(model, seqs, scored).log_probs(model)
    gold = torch.tensor([x for i in has for x in facts[i].truth], device=device)
    lengths = torch.tensor([len(facts[i].truth) for i in has], device=device)
    tok = logp.gather(1, gold[:, None]).squeeze(1)
    starts = torch.cumsum(lengths, 0) - lengths
    first[has] = tok[starts]
    owner = torch.repeat_interleave(torch.arange(len(has), device=device), lengths)
    rest[has] = torch.zeros(len(has), device=device).index_add(0, owner, tok) - tok[starts]
    return first, rest


class _Truths:
    """log P(ground truth) per fact of a batch. Exact costs a forward pass of the truths; the
    estimate takes the first truth token from the target's own forward pass (the same
    position) and the rest as it was at the last exact pass. The rest drifts as the subject's
    rows change, so the estimate only picks which facts get an exact pass."""

    def __init__(self, model: EngramModel, facts: list[FactTokens], known: int) -> None:
        """Exact for the first ``known`` facts now; the others get theirs at a check, the
        only way they enter a step."""
        device = next(model.parameters()).device
        self.facts = facts
        self.token = torch.tensor([t.truth[0] if t.truth else 0 for t in facts], device=device)
        self.first = torch.full((len(facts),), float("nan"), device=device)
        self.rest = self.first.clone()
        self.first[:known], self.rest[:known] = _truth_logprob(model, facts[:known])

    def exact(self, model: EngramModel, idx: list[int]) -> torch.Tensor:
        first, rest = _truth_logprob(model, [self.facts[i] for i in idx])
        self.first[idx], self.rest[idx] = first, rest
        return first + rest

    def estimate(self, idx: list[int], first_logp: torch.Tensor) -> torch.Tensor:
        """``first_logp`` ``[len(idx), vocab]``: log-probs after each prompt."""
        first = first_logp.gather(1, self.token[idx][:, None]).squeeze(1)
        return first + self.rest[idx]


def _scores(model: EngramModel, seqs: _Sequences, select: torch.Tensor,
            gold: list[torch.Tensor], truths: _Truths, settings: DistillSettings,
            exact: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the selected facts: log P(target) (differentiable), target length, and solved
    (CPU bool): the target beats the ground truth by ``margin``; without a ground truth,
    P(target) >= ``stop_prob`` and greedy decoding gives it."""
    device = next(model.parameters()).device
    idx = torch.nonzero(select).flatten().tolist()
    logp = seqs.batch(select).log_probs(model)
    gold_sel = torch.cat([gold[i] for i in idx])
    lengths = torch.tensor([len(gold[i]) for i in idx], device=device)
    owner = torch.repeat_interleave(torch.arange(len(idx), device=device), lengths)
    lp = torch.zeros(len(idx), device=device).index_add(
        0, owner, logp.gather(1, gold_sel[:, None]).squeeze(1))
    wrong = torch.zeros(len(idx), device=device).index_add(
        0, owner, (logp.argmax(-1) != gold_sel).float())
    starts = torch.cumsum(lengths, 0) - lengths
    if exact:
        truth = truths.exact(model, idx)
    else:  # estimate; a fact the estimate calls solved is confirmed by its truth's own pass
        truth = truths.estimate(idx, logp.detach()[starts])
        sure = torch.nonzero(lp.detach() >= truth + settings.margin).flatten().tolist()
        if sure:
            truth[sure] = truths.exact(model, [idx[i] for i in sure])
    by_margin = lp.detach() >= truth + settings.margin
    by_prob = (lp.detach() >= float(np.log(settings.stop_prob))) & (wrong == 0)
    return lp, lengths.float(), torch.where(truth.isnan(), by_prob, by_margin).cpu()


def _solve_batch(model: EngramModel, tokens: list[FactTokens], rows: list[FactRows],
                 keep: list[FactTokens], touched: dict[int, torch.Tensor],
                 locality: _Locality, bounds: dict[int, float], settings: DistillSettings,
                 report: Callable[[int, int], None]
                 ) -> tuple[dict[int, torch.Tensor], int, list[bool]]:
    """Deltas on ``touched`` rows that solve ``tokens`` (and keep ``keep`` solved)."""
    facts = tokens + keep
    device = next(model.parameters()).device
    seqs = _Sequences(model, [t.sequence[:-1] for t in facts],
                      [list(t.predicting) for t in facts], touched)
    owned = _owned(rows, touched, len(facts))
    gold = [torch.tensor(t.target, device=device) for t in facts]
    truths = _Truths(model, facts, len(tokens))
    weights = {lid: model.engram(lid).embed.weight.detach()[t] for lid, t in touched.items()}
    deltas = {lid: torch.zeros_like(w, requires_grad=True) for lid, w in weights.items()}
    adam = _RowAdam(deltas, settings.lr, eps=settings.adam_eps)
    # a fact whose sequence reads none of the rows the batch may move cannot be helped
    movable = seqs.reading({lid: m.any(0) for lid, m in owned.items()})
    unsolved = torch.zeros(len(facts), dtype=torch.bool)
    unsolved[:len(tokens)] = True  # kept facts start solved
    active = unsolved & movable  # the facts in the forward pass of the next step
    step = since_check = 0
    lookups = {lid: DeltaEmbedding(model.engram(lid).embed, touched[lid], deltas[lid])
               for lid in touched}
    with substituted_rows(model, lookups):
        while True:
            final = not active.any() or step >= settings.steps
            if final or since_check >= settings.check_every:
                check = torch.zeros(len(facts), dtype=torch.bool)
                check[:len(tokens)] = True
                if final:  # kept facts are checked only when the batch may be done
                    check |= seqs.reading({lid: (d != 0).any(1) for lid, d in deltas.items()})
                with torch.no_grad():  # the truths' own forward pass only when it may end
                    ok = _scores(model, seqs, check, gold, truths, settings, exact=final)[2]
                unsolved[check] = ~ok
                active, since_check = unsolved & movable, 0
                report(step, int((~unsolved[:len(tokens)]).sum()))
                if not active.any() or step >= settings.steps:
                    break
            lp, n_tokens, ok = _scores(model, seqs, active, gold, truths, settings)
            idx = torch.nonzero(active).flatten()
            failing = (~ok).to(device=device, dtype=torch.float32)
            loss = -(lp / n_tokens * failing).sum()  # a sum: each fact's gradient is its own
            active[idx[ok]] = False  # solved: out of the batch, its rows freeze
            if not active.any():
                continue
            if settings.locality_weight > 0:
                kl = locality.loss(model, active, step)
                if kl is not None:
                    loss = loss + settings.locality_weight * kl
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


def distill(model: EngramModel, tokens: list[FactTokens], fact_rows: list[FactRows],
            locality: list[list[list[int]]], settings: DistillSettings,
            heldout: np.ndarray | None = None,
            progress: Callable[[DistillProgress], None] | None = None,
            keep: list[tuple[FactTokens, FactRows]] = ()) -> DistillResult:
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
    try:
        for k, batch in enumerate(batches):
            touched = {lid: torch.from_numpy(np.unique(np.concatenate(
                [fact_rows[i].rows[lid] for i in batch]))).to(device) for lid in layer_ids}
            use = settings.locality_weight > 0
            loc = _Locality(model, [p for i in batch for p in locality[i]] if use else [],
                            [j for j, i in enumerate(batch) for _ in locality[i]] if use else [],
                            windows if use else [], touched)

            def report(step: int, done: int, k: int = k, n: int = len(batch)) -> None:
                if progress is not None:
                    progress(DistillProgress(k + 1, len(batches), step, done, n))

            # earlier facts that share a row with this batch (hash collisions aside)
            shared = [i for i in solved if any(
                np.isin(fact_rows[i].rows[lid], touched[lid].cpu().numpy()).any()
                for lid in layer_ids)]
            deltas, n_steps, done = _solve_batch(
                model, [tokens[i] for i in batch], [fact_rows[i] for i in batch],
                [tokens[i] for i in shared], touched, loc, bounds, settings, report)
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
