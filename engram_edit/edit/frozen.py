"""The frozen model with some table rows replaced by trainable values: the lookups distill.py
optimizes and overwrite.py differentiates once, and a forward that reads out only the positions
that are scored. The model's parameters are never changed here (ENGRAM_SPEC.md section 5).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engram_edit.errors import BadInputError
from engram_edit.model import EngramModel
from engram_edit.model.blocks import rope_tables


class DeltaEmbedding(nn.Module):
    """The table plus a delta on a few rows; looked up like ``nn.Embedding``.

    With ``owner`` None, ``keys`` are sorted row ids and every sequence sees ``delta``. With
    ``owner`` (``[B]``, the group of each sequence of the batch), ``keys`` are sorted
    ``group * num_rows + row``: each group of sequences has deltas of its own, so one backward
    pass gives every group's gradient separately (overwrite.py's per-fact Jacobians).
    """

    def __init__(self, base: nn.Embedding, keys: torch.Tensor, delta: torch.Tensor,
                 owner: torch.Tensor | None = None) -> None:
        super().__init__()
        self.base, self.keys, self.delta, self.owner = base, keys, delta, owner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.base.weight)
        if len(self.keys) == 0:
            return out
        keys = ids
        if self.owner is not None:
            shape = (-1,) + (1,) * (ids.dim() - 1)
            keys = self.owner.view(shape) * self.base.weight.shape[0] + ids
        pos = torch.searchsorted(self.keys, keys).clamp_max(len(self.keys) - 1)
        hit = (self.keys[pos] == keys).unsqueeze(-1)
        return out + torch.where(hit, self.delta[pos], torch.zeros((), dtype=out.dtype))


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


@dataclass
class ScoredBatch:
    """A right-padded batch and the positions whose next-token distribution is scored."""

    ids: torch.Tensor  # [B, T]
    rows: dict[int, torch.Tensor]  # layer -> [B, T, C] row ids
    batch: torch.Tensor  # [N] sequence of each scored position
    pos: torch.Tensor  # [N] its position

    @classmethod
    def build(cls, model: EngramModel, seqs: list[list[int]],
              scored: list[list[int]]) -> ScoredBatch:
        device = next(model.parameters()).device
        ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        ids = ids.to(device)
        b = torch.tensor([i for i, ps in enumerate(scored) for _ in ps], dtype=torch.long)
        p = torch.tensor([q for ps in scored for q in ps], dtype=torch.long)
        return cls(ids, model.compute_rows(ids), b.to(device), p.to(device))

    def log_probs(self, model: EngramModel) -> torch.Tensor:
        """Next-token log-probs ``[N, vocab]`` at the scored positions (float32)."""
        streams = hidden_streams(model, self.ids, self.rows)
        return F.log_softmax(model.readout_logits(streams[self.batch, self.pos]).float(), -1)

    def reads(self, touched: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per sequence ``[B]``, whether any position reads a row of ``touched`` (layer ->
        row ids); a sequence that reads none cannot change when only those rows do."""
        hit = torch.zeros(len(self.ids), dtype=torch.bool, device=self.ids.device)
        for lid, r in self.rows.items():
            if lid in touched:
                hit |= torch.isin(r, touched[lid]).flatten(1).any(1)
        return hit
