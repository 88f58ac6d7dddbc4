"""overwrite: rows set without an optimization loop. Facts get a closed-form least-squares
update of the rows locate.py picks, which ends as a Patch built by ``rows.rows_patch``.
Setting one n-gram's rows directly is rows.py's (no torch).

The closed form, per fact i with margin f_i = log P(target_new) - log P(ground_truth) (sums,
teacher forced; log P(target_new) alone without a ground truth): one forward and one backward
pass through the frozen model (every layer after the Engram layer, the gate, the norm and the
LM head included) give each fact's gradient g_i of f_i with respect to its own rows, taken
apart per fact. Linearized, f_i moves by g_i . delta. The minimum-norm delta over all touched
rows that moves every fact to its wanted margin m_i solves ``(G G^T + eps I) a = m - f``,
``delta = G^T a`` (eps relative to each fact's own diagonal entry): facts that share a row are
solved jointly through G G^T, and a fact already past its margin asks for no change. With a
cost c_r per row, the delta of least sum c_r ||delta_r||^2 is taken instead: G's entries on
row r are scaled by c_r^-1/2 in the solve and the step by 1/c_r.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engram_edit.edit.costs import RowCosts
from engram_edit.edit.frozen import DeltaEmbedding, ScoredBatch, substituted_rows
from engram_edit.edit.locate import FactRows, FactTokens
from engram_edit.model import EngramModel


@dataclass
class OverwriteSettings:
    margin: float = 3.0  # wanted log P(target_new) - log P(ground_truth), nats
    target_logprob: float = -0.5  # wanted log P(target_new) for a fact without ground truth
    iterations: int = 1  # closed-form solves (1 = the pure closed form; more re-linearize)
    ridge: float = 1e-4  # eps of (G G^T + eps I), relative to each fact's diagonal entry
    norm_bound: float = 2.0  # an edited row's norm stays <= this x the layer's 99th percentile


def layer_norm_bounds(model: EngramModel, factor: float) -> dict[int, float]:
    """Per Engram layer, ``factor`` x the 99th percentile of its row norms (a sample of up to
    65,536 evenly spaced rows): the largest norm an edited row may take."""
    out = {}
    for lid in model.config.engram_layer_ids:
        w = model.engram(lid).embed.weight.detach()
        sample = w[torch.linspace(0, len(w) - 1, min(len(w), 65536)).long()]
        out[lid] = factor * float(sample.norm(dim=-1).float().quantile(0.99))
    return out


def clip_rows(rows: torch.Tensor, bound: float) -> torch.Tensor:
    """``rows [n, width]`` scaled down where their norm exceeds ``bound``."""
    scale = (bound / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp_max(1.0)
    return rows * scale


def _gram(grad: torch.Tensor, owner: torch.Tensor, index: torch.Tensor,
          facts: int) -> torch.Tensor:
    """G G^T of one layer, where fact i's row of G is its gradient ``grad[k]`` (``owner[k] =
    i``) placed on shared row ``index[k]``: a sum over every pair of entries on one row."""
    idx = index.cpu().numpy()
    order = np.argsort(idx, kind="stable")
    starts = np.flatnonzero(np.r_[True, idx[order][1:] != idx[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    a, b = [], []
    for first, last in zip(starts.tolist(), ends.tolist(), strict=True):
        members = order[first:last]
        a.append(np.repeat(members, last - first))
        b.append(np.tile(members, last - first))
    pa = torch.from_numpy(np.concatenate(a)).to(grad.device)
    pb = torch.from_numpy(np.concatenate(b)).to(grad.device)
    gram = torch.zeros(facts, facts, device=grad.device)
    return gram.index_put_((owner[pa], owner[pb]), (grad[pa] * grad[pb]).sum(-1),
                           accumulate=True)


def _margins(model: EngramModel, tokens: list[FactTokens], truths: list[list[int] | None],
             keys: dict[int, torch.Tensor], deltas: dict[int, torch.Tensor]) -> torch.Tensor:
    """f_i per fact, through per-fact deltas (sequence groups = facts)."""
    seqs, scored, gold, owner, sign, groups = [], [], [], [], [], []
    for i, (t, truth) in enumerate(zip(tokens, truths, strict=True)):
        for answer, s in ((t.target, 1.0), (truth, -1.0)):
            if answer is None:
                continue
            seq = t.prompt + answer
            seqs.append(seq[:-1])
            scored.append(list(range(len(t.prompt) - 1, len(seq) - 1)))
            gold += answer
            owner += [i] * len(answer)
            sign += [s] * len(answer)
            groups.append(i)
    device = next(model.parameters()).device
    batch = ScoredBatch.build(model, seqs, scored, groups)
    lookups = {lid: DeltaEmbedding(model.engram(lid).embed, keys[lid], deltas[lid],
                                   grouped=True) for lid in keys}
    with substituted_rows(model, lookups):
        logp = batch.log_probs(model)
    tok = logp.gather(1, torch.tensor(gold, device=device)[:, None]).squeeze(1)
    tok = tok * torch.tensor(sign, device=device)
    return torch.zeros(len(tokens), device=device).index_add(0, torch.tensor(owner, device=device),
                                                             tok)


def closed_form(model: EngramModel, tokens: list[FactTokens], truths: list[list[int] | None],
                fact_rows: list[FactRows], settings: OverwriteSettings,
                row_cost: RowCosts | None = None
                ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """New values of every touched row by the closed form of the module docstring.

    Args:
        model (`EngramModel`): the model with its current rows (tables inside, float32).
        tokens (`list[FactTokens]`): the facts, tokenized (locate.tokenize_fact).
        truths (`list[list[int] | None]`): each fact's ground-truth answer ids, or None.
        fact_rows (`list[FactRows]`): each fact's rows (locate.locate_rows).
        settings (`OverwriteSettings`): margins, iterations, ridge, norm bound.
        row_cost (`RowCosts`, optional): the cost of changing each row (costs.py); the solve
            minimizes sum cost_r ||delta_r||^2 instead of the plain norm, so costly rows move
            less.

    Returns:
        `dict[int, tuple[np.ndarray, np.ndarray]]`: layer -> (sorted rows, float32 values).
    """
    device = next(model.parameters()).device
    layer_ids = model.config.engram_layer_ids
    bounds = layer_norm_bounds(model, settings.norm_bound)
    wanted = torch.tensor([settings.margin if t is not None else settings.target_logprob
                           for t in truths], device=device)
    touched, keys, index, scale = {}, {}, {}, {}
    for lid in layer_ids:
        n_rows = model.engram(lid).embed.weight.shape[0]
        per_fact = [fr.rows[lid] for fr in fact_rows]
        touched[lid] = np.unique(np.concatenate(per_fact)) if per_fact else np.zeros(0, np.int64)
        k = np.concatenate([i * n_rows + r for i, r in enumerate(per_fact)])
        keys[lid] = torch.from_numpy(k).to(device)  # sorted: facts in order, rows sorted
        index[lid] = torch.from_numpy(np.searchsorted(touched[lid], k % n_rows)).to(device)
        cost = np.ones(len(k)) if row_cost is None else row_cost(lid, k % n_rows)
        scale[lid] = torch.from_numpy(1.0 / cost).float().to(device)[:, None]
    shared = {lid: torch.zeros(len(touched[lid]), model.engram(lid).embed.weight.shape[1],
                               device=device) for lid in layer_ids}
    owners = {lid: torch.from_numpy(np.concatenate(
        [np.full(len(fr.rows[lid]), i) for i, fr in enumerate(fact_rows)])).to(device)
        for lid in layer_ids}
    for _ in range(settings.iterations):
        deltas = {lid: shared[lid][index[lid]].clone().requires_grad_(True) for lid in layer_ids}
        f = _margins(model, tokens, truths, keys, deltas)
        f.sum().backward()  # fact i's margin depends on its own deltas only
        need = (wanted - f.detach()).clamp_min(0.0)
        gram = torch.zeros(len(tokens), len(tokens), device=device)
        for lid in layer_ids:
            if len(index[lid]):
                gram += _gram(deltas[lid].grad * scale[lid].sqrt(), owners[lid], index[lid],
                              len(tokens))
        # relative to each fact's own curvature, so a fact with small gradients still moves
        damping = settings.ridge * gram.diagonal().clamp_min(1e-12)
        a = torch.linalg.solve(gram + torch.diag(damping), need)
        for lid in layer_ids:
            step = torch.zeros_like(shared[lid]).index_add(
                0, index[lid], deltas[lid].grad * scale[lid] * a[owners[lid]][:, None])
            shared[lid] = shared[lid] + step
            weight = model.engram(lid).embed.weight.detach()[torch.from_numpy(touched[lid])]
            shared[lid] = clip_rows(weight + shared[lid], bounds[lid]) - weight
    out = {}
    for lid in layer_ids:
        rows = torch.from_numpy(touched[lid]).to(device)
        weight = model.engram(lid).embed.weight.detach()[rows]
        out[lid] = (touched[lid], (weight + shared[lid]).float().cpu().numpy())
    return out
