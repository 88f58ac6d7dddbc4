"""The frozen model with some table rows replaced by trainable values: the lookups distill.py
optimizes and overwrite.py differentiates once, and a forward that reads out only the positions
that are scored. The model's parameters are never changed here (docs/engram.md section 5).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engram_edit.errors import BadInputError
from engram_edit.model import EngramModel
from engram_edit.model.blocks import rope_tables


class DeltaEmbedding(nn.Module):
    """The table plus a delta on a few rows; looked up like ``nn.Embedding``.

    ``keys`` are sorted row ids, and every sequence sees ``delta``. With ``grouped``, the ids
    looked up are ``group * num_rows + row`` (``ScoredBatch.build(..., groups=...)`` makes
    them) and ``keys`` are such ids too: each group of sequences has deltas of its own, so one
    backward pass gives every group's gradient separately (overwrite.py's per-fact Jacobians).
    """

    def __init__(self, base: nn.Embedding, keys: torch.Tensor, delta: torch.Tensor,
                 grouped: bool = False) -> None:
        super().__init__()
        self.base, self.keys, self.delta, self.grouped = base, keys, delta, grouped

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids % self.base.weight.shape[0] if self.grouped else ids
        out = F.embedding(rows, self.base.weight)
        n = len(self.keys)
        if n == 0:
            return out
        pos = torch.searchsorted(self.keys, ids).clamp_max(n - 1)
        pos = torch.where(self.keys[pos] == ids, pos, n)  # n: a zero row, for the other ids
        padded = torch.cat([self.delta, self.delta.new_zeros(1, self.delta.shape[1])])
        return out + F.embedding(pos, padded.to(out.dtype))  # its backward beats a gather's


@contextmanager
def substituted_rows(model: EngramModel, lookups: dict[int, nn.Module]) -> Iterator[None]:
    """Within the block, layer L's Engram module gathers through ``lookups[L]`` and no model
    parameter takes gradients; both are restored on exit.

    Raises:
        BadInputError: the model's tables are not its parameters (placement other than gpu).
    """
    if model.row_source.placement != "gpu":
        raise BadInputError(f"editing needs the tables inside the model (placement 'gpu'), "
                            f"not {model.row_source.placement!r}")
    saved = {lid: model.engram(lid).embed for lid in lookups}
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        for lid, module in lookups.items():
            model.engram(lid).embed = module
        yield
    finally:
        for lid, module in saved.items():
            model.engram(lid).embed = module
        for p, flag in grads:
            p.requires_grad_(flag)


def hidden_streams(model: EngramModel, ids: torch.Tensor,
                   rows: dict[int, torch.Tensor]) -> torch.Tensor:
    """The streams ``[B, T, n, D]`` before the readout: EngramModel.forward without the logits,
    so that only the positions that are scored pay for the LM head."""
    b, t = ids.shape
    cfg = model.config
    model.row_source.prefetch(rows)
    cos, sin = rope_tables(t, cfg.head_dim, cfg.rope_theta, ids.device)
    x = model.embed_tokens(ids)
    streams = x.unsqueeze(-2).expand(b, t, cfg.hc_mult, x.shape[-1])
    for i, block in enumerate(model.layers):
        streams, _ = block(streams, cos, sin, rows.get(i) if block.engram is not None else None)
    return streams


PART_COST = 256  # a forward pass costs about as much as this many more padded positions
MAX_PARTS = 4


def length_parts(lengths: list[int]) -> list[list[int]]:
    """Sequence indices grouped into at most ``MAX_PARTS`` runs of the length order, each run
    padded to its longest: the grouping of least ``sum(size x longest) + PART_COST x parts``
    (cuts fall between distinct lengths; a dynamic program over them)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = [lengths[i] for i in order]
    ends = [j + 1 for j in range(len(ordered))
            if j + 1 == len(ordered) or ordered[j + 1] != ordered[j]]

    def cost(a: int, b: int) -> int:  # a part of ordered[ends[a-1]:ends[b]] (a = 0: from 0)
        first = ends[a - 1] if a else 0
        return (ends[b] - first) * ordered[ends[b] - 1] + PART_COST

    # best[k][b]: (cost, cut) of covering ordered[:ends[b]] with k + 1 parts
    best = [[(cost(0, b), -1) for b in range(len(ends))]]
    for _ in range(1, MAX_PARTS):
        prev = best[-1]
        best.append([min(((prev[a - 1][0] + cost(a, b), a - 1) for a in range(1, b + 1)),
                         default=prev[b]) for b in range(len(ends))])
    k = min(range(len(best)), key=lambda k: best[k][-1][0])
    parts, b = [], len(ends) - 1
    while b >= 0:
        cut = best[k][b][1]
        parts.append(order[ends[cut] if cut >= 0 else 0:ends[b]])
        b, k = cut, k - 1
    return parts[::-1]


@dataclass
class _Part:
    """Sequences of similar length, run as one forward pass trimmed to their longest."""

    seqs: torch.Tensor  # [b] indices into the batch
    width: int
    local: torch.Tensor  # [n] scored positions': index in ``seqs``
    pos: torch.Tensor  # [n] their position


@dataclass
class ScoredBatch:
    """A right-padded batch and the positions whose next-token distribution is scored.

    The forward pass runs in parts of similar length (``length_parts``), so that short
    sequences do not pay for the padding of long ones."""

    ids: torch.Tensor  # [B, T]
    rows: dict[int, torch.Tensor]  # layer -> [B, T, C] row ids
    parts: list[_Part]
    order: torch.Tensor  # [N]: where each scored position lands in the parts' output

    @classmethod
    def build(cls, model: EngramModel, seqs: list[list[int]], scored: list[list[int]],
              groups: list[int] | None = None) -> ScoredBatch:
        """``groups``: a group per sequence, whose row ids become ``group * num_rows + row``
        (for a grouped DeltaEmbedding)."""
        device = next(model.parameters()).device
        ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        ids = ids.to(device)
        rows = model.compute_rows(ids)
        if groups is not None:
            g = torch.tensor(groups, device=device).view(-1, 1, 1)
            rows = {lid: r + g * model.hasher.rows_per_layer[lid] for lid, r in rows.items()}
        parts, placed = [], []
        for members in length_parts([len(s) for s in seqs]):
            local = [j for j, i in enumerate(members) for _ in scored[i]]
            pos = [q for i in members for q in scored[i]]
            placed += [(i, n) for i in members for n in range(len(scored[i]))]
            parts.append(_Part(torch.tensor(members, device=device),
                                 max(len(seqs[i]) for i in members),
                                 torch.tensor(local, dtype=torch.long, device=device),
                                 torch.tensor(pos, dtype=torch.long, device=device)))
        first = np.cumsum([0] + [len(ps) for ps in scored])
        where = np.empty(int(first[-1]), dtype=np.int64)
        for out, (i, n) in enumerate(placed):
            where[first[i] + n] = out
        return cls(ids, rows, parts, torch.from_numpy(where).to(device))

    def log_probs(self, model: EngramModel) -> torch.Tensor:
        """Next-token log-probs ``[N, vocab]`` at the scored positions (float32), in the order
        the sequences and their positions were given."""
        parts = []
        for g in self.parts:
            rows = {lid: r[g.seqs, :g.width] for lid, r in self.rows.items()}
            streams = hidden_streams(model, self.ids[g.seqs, :g.width], rows)
            parts.append(model.readout_logits(streams[g.local, g.pos]))
        logits = torch.cat(parts)[self.order]
        return F.log_softmax(logits.float(), -1)

    def reads(self, touched: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per sequence ``[B]``, whether any position reads a row of ``touched`` (layer ->
        row ids); a sequence that reads none cannot change when only those rows do."""
        hit = torch.zeros(len(self.ids), dtype=torch.bool, device=self.ids.device)
        for lid, r in self.rows.items():
            if lid in touched:
                hit |= torch.isin(r, touched[lid]).flatten(1).any(1)
        return hit
