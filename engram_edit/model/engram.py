"""The Engram module of one layer (docs/engram.md section 5): gather table rows, gate, ShortConv.

Row ids come from ``engram_edit.hashing``; the rows come from a row source (placement.py): by
default the module's own ``embed`` parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engram_edit.config import EngramConfig
from engram_edit.model.norms import BranchRMSNorm
from engram_edit.model.placement import DeviceRows, RowSource


class EngramModule(nn.Module):
    """``source`` None: the module owns its table as ``embed`` and gathers from it (DeviceRows);
    else ``embed`` is None and ``gather`` asks ``source`` for the rows of layer ``layer_id``."""

    def __init__(self, config: EngramConfig, num_rows: int, layer_id: int = 0,
                 source: RowSource | None = None):
        super().__init__()
        n, d, e = config.hc_mult, config.hidden_size, config.engram_input_dim
        self.hc_mult, self.hidden, self.layer_id = n, d, layer_id
        self.embed = (nn.Embedding(num_rows, config.engram_head_dim)  # THE table
                      if source is None else None)
        self.source = source if source is not None else DeviceRows({layer_id: self})
        self.value_proj = nn.Linear(e, d)
        self.key_proj = nn.Linear(e, n * d)  # branch b owns outputs b*d .. (b+1)*d-1
        self.key_norm = BranchRMSNorm(n, d, eps=None)
        self.query_norm = BranchRMSNorm(n, d, eps=None)
        self.conv_norm = BranchRMSNorm(n, d, eps=1e-5)
        self.dilation = config.engram_max_ngram_size
        self.conv = nn.Conv1d(n * d, n * d, config.engram_kernel_size, groups=n * d,
                              dilation=self.dilation, bias=False)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Table rows ``[..., C]`` -> their concatenation in column order ``[..., C*head_dim]``."""
        return self.source.gather(self.layer_id, rows).flatten(-2)

    def value(self, e: torch.Tensor) -> torch.Tensor:
        """``v = W_v e + b_v`` of gathered rows ``e [..., E]`` -> ``[..., hidden]``."""
        return self.value_proj(e)

    def short_conv(self, u: torch.Tensor) -> torch.Tensor:
        """Causal depthwise dilated conv over time of ``u [B, T, n, D]``, then SiLU.

        Written as a sum of shifted products (tap j reads ``(K-1-j) * dilation`` positions
        back): on the CPU the gradient of a depthwise ``conv1d`` costs several times this."""
        b, t, n, d = u.shape
        x = self.conv_norm(u).reshape(b, t, n * d)
        w = self.conv.weight[:, 0, :]  # [n*D, K]
        taps = w.shape[1]
        x = F.pad(x, (0, 0, (taps - 1) * self.dilation, 0))  # zeros before the first position
        y = sum(x[:, j * self.dilation:j * self.dilation + t] * w[:, j] for j in range(taps))
        return F.silu(y).reshape(b, t, n, d)

    def forward(self, streams: torch.Tensor,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output to add to ``streams [B, T, n, D]`` and the gates ``alpha [B, T, n]``."""
        b, t, n, d = streams.shape
        e = self.gather(rows)  # [B, T, E]
        v = self.value(e)  # [B, T, D]
        k = self.key_norm(self.key_proj(e).view(b, t, n, d))
        q = self.query_norm(streams)
        g = (k * q).sum(-1) / math.sqrt(d)  # [B, T, n]
        g = g.sign() * g.abs().clamp_min(1e-6).sqrt()
        alpha = torch.sigmoid(g)
        u = alpha.unsqueeze(-1) * v.unsqueeze(-2)  # [B, T, n, D]
        return u + self.short_conv(u), alpha
