"""RMSNorm, over one vector or per hyper-connection branch (docs/engram.md sections 5-6).

bf16/fp16 inputs are normalised in float32, so autocast keeps the float32 eps of the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """RMS-normalise the last dim of ``x`` and scale by ``weight`` (broadcast from the right).

    ``eps=None`` is torch's default: the machine epsilon of the dtype the norm is computed in.
    """
    low = x.dtype in (torch.float16, torch.bfloat16)
    y = F.rms_norm(x.float() if low else x, (x.shape[-1],), eps=eps)
    if weight is not None:
        y = y * weight
    return y.to(x.dtype) if low else y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float | None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class BranchRMSNorm(nn.Module):
    """One RMSNorm per branch: ``x [..., n, dim]`` with weight ``[n, dim]``."""

    def __init__(self, branches: int, dim: int, eps: float | None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(branches, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
