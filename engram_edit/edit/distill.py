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
    lr: float = 0.02  # Adam step size, in row units (rows have norm ~0.1-1)
    batch_facts: int = 256  # facts optimized together
    stop_prob: float = 0.6  # a fact is solved when P(target | prompt) >= this and greedy gives it
    locality_weight: float = 1.0  # weight of the KL to the unedited model
    heldout_windows: int = 16  # held-out windows in the locality term (0: none)
    heldout_tokens: int = 48  # tokens per held-out window
    norm_bound: float = 2.0  # an edited row's norm stays <= this x the layer's 99th percentile
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
    last token) and of held-out windows (every position); the unedited side is cached."""

    def __init__(self, model: EngramModel, prompts: list[list[int]], windows: list[list[int]],
                 touched: dict[int, torch.Tensor]) -> None:
        seqs = prompts + windows
        scored = [[len(s) - 1] for s in prompts] + [list(range(len(w))) for w in windows]
        self.seqs = _Sequences(model, seqs, scored, touched)
        self.reference: list[torch.Tensor] = []
        if seqs:
            everything = torch.ones(len(seqs), dtype=torch.bool)
            with torch.no_grad():
                logp = self.seqs.batch(everything).log_probs(model)
            self.reference = list(logp.split([len(s) for s in scored]))

    def loss(self, model: EngramModel, moving: dict[int, torch.Tensor]) -> torch.Tensor | None:
        if not len(self.seqs):
            return None
        select = self.seqs.reading(moving)
        if not select.any():
            return None
        logp = self.seqs.batch(select).log_probs(model)
        ref = torch.cat([self.reference[i] for i in torch.nonzero(select).flatten().tolist()])
        return (ref.exp() * (ref - logp)).sum(-1).mean()


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
    weights = {lid: model.engram(lid).embed.weight.detach()[t] for lid, t in touched.items()}
    deltas = {lid: torch.zeros_like(w, requires_grad=True) for lid, w in weights.items()}
    adam = _RowAdam(deltas, settings.lr)
    threshold = float(np.log(settings.stop_prob))
    solved = torch.zeros(len(facts), dtype=torch.bool)
    unsolved = ~solved
    unsolved[len(tokens):] = False  # kept facts are solved; they are checked while they can move
    step = 0
    lookups = {lid: DeltaEmbedding(model.engram(lid).embed, touched[lid], deltas[lid])
               for lid in touched}
    with substituted_rows(model, lookups):
        while True:
            moving = {lid: (m[unsolved.to(m.device)]).any(0) for lid, m in owned.items()}
            select = unsolved | seqs.reading(moving)
            idx = torch.nonzero(select).flatten()
            logp = seqs.batch(select).log_probs(model)
            gold_sel = torch.cat([gold[i] for i in idx.tolist()])
            owner = torch.repeat_interleave(torch.arange(len(idx), device=device),
                                            torch.tensor([len(gold[i]) for i in idx.tolist()],
                                                         device=device))
            tok_lp = logp.gather(1, gold_sel[:, None]).squeeze(1)
            lp = torch.zeros(len(idx), device=device).index_add(0, owner, tok_lp)
            wrong = torch.zeros(len(idx), device=device).index_add(
                0, owner, (logp.argmax(-1) != gold_sel).float())
            ok = ((lp.detach() >= threshold) & (wrong == 0)).cpu()
            unsolved[idx] = ~ok
            report(step, int((~unsolved[:len(tokens)]).sum()))
            if not unsolved.any() or step >= settings.steps:
                break
            moving = {lid: (m[unsolved.to(m.device)]).any(0) for lid, m in owned.items()}
            failing = (~ok).to(device=device, dtype=torch.float32)
            n_tokens = torch.zeros(len(idx), device=device).index_add(
                0, owner, torch.ones_like(tok_lp))
            loss = -(lp / n_tokens * failing).sum() / failing.sum().clamp_min(1.0)
            if settings.locality_weight > 0:
                kl = locality.loss(model, moving)
                if kl is not None:
                    loss = loss + settings.locality_weight * kl
            for d in deltas.values():
                d.grad = None
            loss.backward()
            adam.step(moving)
            step += 1
            with torch.no_grad():
                for lid, d in deltas.items():
                    d.copy_(clip_rows(weights[lid] + d, bounds[lid]) - weights[lid])
    return ({lid: d.detach() for lid, d in deltas.items()}, step,
            (~unsolved[:len(tokens)]).tolist())


def distill(model: EngramModel, tokens: list[FactTokens], fact_rows: list[FactRows],
            locality: list[list[list[int]]], settings: DistillSettings,
            heldout: np.ndarray | None = None,
            progress: Callable[[DistillProgress], None] | None = None) -> DistillResult:
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

    Returns:
        `DistillResult`: per layer the sorted touched rows and their new float32 values.
    """
    bounds = layer_norm_bounds(model, settings.norm_bound)
    windows = _heldout_windows(heldout, settings)
    batches = group_facts(fact_rows, settings.batch_facts)
    layer_ids = model.config.engram_layer_ids
    device = next(model.parameters()).device
    originals: dict[int, dict[int, torch.Tensor]] = {lid: {} for lid in layer_ids}
    steps, undone = [], []
    solved: list[int] = []
    try:
        for k, batch in enumerate(batches):
            touched = {lid: torch.from_numpy(np.unique(np.concatenate(
                [fact_rows[i].rows[lid] for i in batch]))).to(device) for lid in layer_ids}
            loc = _Locality(model, [p for i in batch for p in locality[i]], windows, touched)

            def report(step: int, done: int, k: int = k, n: int = len(batch)) -> None:
                if progress is not None:
                    progress(DistillProgress(k + 1, len(batches), step, done, n))

            deltas, n_steps, done = _solve_batch(
                model, [tokens[i] for i in batch], [fact_rows[i] for i in batch],
                [tokens[i] for i in solved], touched, loc, bounds, settings, report)
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
