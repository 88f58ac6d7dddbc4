"""The backbone sublayers: causal attention with RoPE, SwiGLU MLP and a small top-k MoE.

Each maps ``[B, T, hidden] -> [B, T, hidden]``; norms and residuals are the block's business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engram_edit.config import EngramConfig


def rope_tables(positions: int, head_dim: int, theta: float,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each ``[positions, head_dim / 2]`` (float32)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                         / head_dim)
    angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, head_dim]`` pairwise (first half with second half of each head)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: EngramConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        heads = (b, t, self.n_heads, d // self.n_heads)
        q = self.q_proj(x).view(heads).transpose(1, 2)  # [B, H, T, head_dim]
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, config: EngramConfig):
        super().__init__()
        d, h = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routing over SwiGLU experts; the chosen experts' softmax weights are renormalised.

    No load-balancing loss is computed here; routing is per token, so causality is untouched.
    """

    def __init__(self, config: EngramConfig):
        super().__init__()
        self.top_k = config.moe_top_k
        self.router = nn.Linear(config.hidden_size, config.moe_num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config) for _ in range(config.moe_num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, hidden]
        acc = torch.promote_types(x.dtype, torch.float32)  # route and sum in >= float32
        probs = torch.softmax(self.router(x).to(acc), dim=-1)
        weight, expert = probs.topk(self.top_k, dim=-1)  # [N, top_k]
        weight = weight / weight.sum(-1, keepdim=True)
        out = torch.zeros_like(x, dtype=acc)
        for e, mlp in enumerate(self.experts):
            token, slot = (expert == e).nonzero(as_tuple=True)
            y = mlp(x[token]) * weight[token, slot, None]
            out = out.index_add(0, token, y.to(out.dtype))
        return out.view(shape).to(x.dtype)
