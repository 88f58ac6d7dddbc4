"""Hyper-connections (docs/engram.md section 6): n residual streams, read by H_pre, written by
H_post, mixed by a doubly stochastic H_res; plus the readout the final norm reads from.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engram_edit.config import EngramConfig


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Row-softmax of ``logits [n, n]``, then ``iters`` rounds of column and row normalisation.

    The result is row-stochastic always and close to doubly stochastic after a few rounds.
    """
    m = torch.softmax(logits, dim=-1)
    for _ in range(iters):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    return m


class HyperConnection(nn.Module):
    """Wraps one sublayer F: ``X <- H_res X + b (outer) F(sum_i a_i X_i)``.

    With hc_mult 1 there is nothing to mix or read: ``X <- X + b F(X)``.
    Init (so the untrained model is a plain pre-norm transformer over identical copies):
    ``b = 2 sigmoid(0) = 1``; H_res has 0.95 on the diagonal; dynamic terms start at zero (their
    weights still get gradients). Sublayer ``index`` leans on stream ``index mod n``
    (a = 0.73 vs 0.27): the copies are equal at first, so the sum is still one copy up to scale,
    which the sublayer's RMSNorm removes, but the copies then receive different gradients.
    """

    def __init__(self, config: EngramConfig, index: int):
        super().__init__()
        n = self.n = config.hc_mult
        self.iters = config.hc_sinkhorn_iters
        self.eps = config.rms_norm_eps
        self.index = index
        self.post_logits = nn.Parameter(torch.empty(n))
        if n > 1:
            self.pre_logits = nn.Parameter(torch.empty(n))
            self.res_logits = nn.Parameter(torch.empty(n, n))
        # input-dependent terms for (H_pre if n > 1) and H_post, from the RMS-normed flat streams
        self.dyn_proj = (nn.Linear(n * config.hidden_size, 2 * n if n > 1 else n, bias=False)
                         if config.hc_dynamic else None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n = self.n
        nn.init.zeros_(self.post_logits)
        if n > 1:
            self.pre_logits.fill_(-1.0)
            self.pre_logits[self.index % n] = 1.0
            diag = math.log(19 * (n - 1))  # exp(diag) / (exp(diag) + n - 1) = 0.95
            self.res_logits.copy_(torch.eye(n) * diag)
        if self.dyn_proj is not None:
            nn.init.zeros_(self.dyn_proj.weight)

    def forward(self, streams: torch.Tensor,
                sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        n = self.n
        # the streams are the residual: mix them in their own dtype even under autocast
        with torch.autocast(streams.device.type, enabled=False):
            post = self.post_logits
            pre = self.pre_logits if n > 1 else None
            if self.dyn_proj is not None:
                flat = streams.flatten(-2)  # [B, T, n*D]
                # W rmsnorm(x) = (W x) / rms(x): saves normalising the wide input
                ms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square() / flat.shape[-1]
                dyn = F.linear(flat, self.dyn_proj.weight.to(flat.dtype))
                dyn = dyn * torch.rsqrt(ms + self.eps)
                post = post + dyn[..., n:] if n > 1 else post + dyn
                if pre is not None:
                    pre = pre + dyn[..., :n]
            b = (2 * torch.sigmoid(post)).to(streams.dtype).unsqueeze(-1)  # [n, 1] or [B, T, n, 1]
            if n == 1:
                x = streams[:, :, 0]
            else:
                a = torch.sigmoid(pre).to(streams.dtype)
                x = torch.matmul(a.unsqueeze(-2), streams).squeeze(-2)  # [B, T, D]
        y = sublayer(x)
        with torch.autocast(streams.device.type, enabled=False):
            y = y.to(streams.dtype).unsqueeze(-2)  # [B, T, 1, D]
            if n == 1:
                return torch.addcmul(streams, b, y)
            h_res = sinkhorn(self.res_logits, self.iters).to(streams.dtype)
            return torch.addcmul(torch.matmul(h_res, streams), b, y)  # [n,n] @ [B,T,n,D]


class LearnedReadout(nn.Module):
    """What the final norm reads: ``sum_i sigmoid(logits_i) X_i`` (equal weights at init)."""

    def __init__(self, config: EngramConfig):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(config.hc_mult))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(self.logits).unsqueeze(-1) * streams).sum(-2)
