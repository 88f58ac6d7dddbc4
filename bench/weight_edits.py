"""Weight-edit baselines for the patch benchmark: the same facts written into one MLP of the
backbone instead of into Engram rows, so that row edits can be compared with the edits the
field runs on dense models.

  ft_l   constrained fine-tuning of one MLP's down projection, as EasyEdit's FT-L runs it:
         Adam on the negative log-likelihood of the target tokens (the prompt unscored), every
         weight clamped after each step to within ``norm_constraint`` of its start.
  memit  the closed-form MLP edit of ROME, with the keys of every fact solved together as
         MEMIT does (on one layer here): a key ``k`` per fact (the down projection's input at
         the subject's last prompt token), a target value ``v* = W k + delta`` with ``delta``
         optimized so that the prompt continues with the target, then
         ``W += R^T K (lam C + K^T K)^-1`` with ``R`` the deltas, ``K`` the keys and ``C`` the
         keys' second moment over held-out text. One fact alone is ROME's rank-one update.

Both edit the model in memory and round the edited matrix to the dtype it is stored in (as a
saved model would hold it); ``restore`` puts the original matrix back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engram_edit.edit.facts import Fact
from engram_edit.edit.locate import tokenize_fact
from engram_edit.model import EngramModel
from engram_edit.tokenizer import EngramTokenizer


@dataclass
class Encoded:
    """Facts as right-padded teacher-forced sequences (``prompt + target``)."""

    ids: torch.Tensor  # int64 [n, T]
    scored: torch.Tensor  # bool [n, T]: the next token is a target token
    labels: torch.Tensor  # int64 [n, T]: the next token (0 where not scored)
    subject_last: torch.Tensor  # int64 [n]: the subject's last prompt token (else the last)


@dataclass
class WeightEdit:
    layer: int
    seconds: float  # the edit's computation, model already loaded
    changed_bytes: int  # bytes of the stored matrix that differ: what an undo must keep
    matrix_bytes: int  # bytes of the whole stored matrix


def encode(facts: Sequence[Fact], tokenizer: EngramTokenizer) -> Encoded:
    toks = [tokenize_fact(f, tokenizer) for f in facts]
    width = max(len(t.sequence) for t in toks)
    ids = torch.zeros(len(toks), width, dtype=torch.long)
    scored = torch.zeros(len(toks), width, dtype=torch.bool)
    labels = torch.zeros(len(toks), width, dtype=torch.long)
    last = torch.zeros(len(toks), dtype=torch.long)
    for i, t in enumerate(toks):
        seq = t.sequence
        ids[i, :len(seq)] = torch.tensor(seq)
        pos = torch.tensor(list(t.predicting))
        scored[i, pos] = True
        labels[i, pos] = torch.tensor(t.target)
        last[i] = max(t.subject) if t.subject else len(t.prompt) - 1
    return Encoded(ids, scored, labels, last)


def _target_nll(model: EngramModel, enc: Encoded, rows: torch.Tensor) -> torch.Tensor:
    """Mean over facts of the mean negative log-likelihood of their target tokens."""
    logits = model(enc.ids[rows]).logits.float()
    mask = enc.scored[rows]
    nll = F.cross_entropy(logits.transpose(1, 2), enc.labels[rows], reduction="none")
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


def _down_proj(model: EngramModel, layer: int) -> torch.nn.Linear:
    mlp = model.layers[layer].mlp
    if not hasattr(mlp, "down_proj"):
        raise ValueError(f"layer {layer}: the baselines edit a dense MLP, this one is a MoE")
    return mlp.down_proj


class _Frozen:
    """Every parameter frozen but ``weight`` for the block's duration."""

    def __init__(self, model: EngramModel, weight: torch.Tensor) -> None:
        self.model, self.weight = model, weight

    def __enter__(self) -> None:
        self.was = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weight.requires_grad_(True)

    def __exit__(self, *exc) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.was[n])


def _stored(weight: torch.Tensor, original: torch.Tensor, stored_dtype: torch.dtype,
            started: float, layer: int) -> WeightEdit:
    """Round the edited matrix to its stored dtype; count what changed."""
    with torch.no_grad():
        weight.copy_(weight.to(stored_dtype).float())
        changed = int((weight.to(stored_dtype) != original.to(stored_dtype)).sum())
    size = torch.finfo(stored_dtype).bits // 8
    return WeightEdit(layer, time.perf_counter() - started, changed * size, weight.numel() * size)


def ft_l(model: EngramModel, tokenizer: EngramTokenizer, facts: Sequence[Fact], layer: int,
         stored_dtype: torch.dtype, steps: int = 25, lr: float = 5e-4,
         norm_constraint: float = 5e-5, batch_size: int = 64, seed: int = 0
         ) -> tuple[WeightEdit, torch.Tensor]:
    """FT-L on ``layer``'s down projection; returns the edit and the original matrix."""
    started = time.perf_counter()
    enc = encode(facts, tokenizer)
    weight = _down_proj(model, layer).weight
    original = weight.detach().clone()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([weight], lr=lr)
    with _Frozen(model, weight):
        for _ in range(steps):
            for rows in torch.randperm(len(facts), generator=gen).split(batch_size):
                opt.zero_grad()
                _target_nll(model, enc, rows).backward()
                opt.step()
                with torch.no_grad():
                    weight.copy_(torch.clamp(weight, original - norm_constraint,
                                             original + norm_constraint))
    weight.grad = None
    return _stored(weight, original, stored_dtype, started, layer), original


@torch.no_grad()
def key_moment(model: EngramModel, layer: int, windows: np.ndarray) -> torch.Tensor:
    """``E[k k^T]`` of the down projection's inputs over every position of ``windows``."""
    down = _down_proj(model, layer)
    keys: list[torch.Tensor] = []
    hook = down.register_forward_pre_hook(lambda _m, args: keys.append(args[0].flatten(0, 1)))
    try:
        for chunk in np.array_split(windows, max(1, len(windows) // 16)):
            model(torch.from_numpy(np.ascontiguousarray(chunk)).long())
    finally:
        hook.remove()
    k = torch.cat(keys).double()
    return k.T @ k / len(k)


def memit(model: EngramModel, tokenizer: EngramTokenizer, facts: Sequence[Fact], layer: int,
          stored_dtype: torch.dtype, moment: torch.Tensor, lam: float = 15000.0,
          steps: int = 25, lr: float = 0.5, weight_decay: float = 1e-3,
          clamp_norm: float = 4.0) -> tuple[WeightEdit, torch.Tensor]:
    """The ROME/MEMIT closed form on ``layer``'s down projection; ``moment`` is
    ``key_moment``'s. Returns the edit and the original matrix."""
    started = time.perf_counter()
    enc = encode(facts, tokenizer)
    down = _down_proj(model, layer)
    weight = down.weight
    original = weight.detach().clone()
    at = (torch.arange(len(facts)), enc.subject_last)
    captured: list[torch.Tensor] = []
    hook = down.register_forward_pre_hook(lambda _m, args: captured.append(args[0][at]))
    with torch.no_grad():
        try:
            model(enc.ids)
        finally:
            hook.remove()
    keys = captured[0].detach()  # [n, intermediate]
    values = keys @ weight.detach().T  # [n, hidden]
    delta = torch.zeros_like(values, requires_grad=True)
    limit = clamp_norm * values.norm(dim=1, keepdim=True)

    def add_delta(_m, _args, out: torch.Tensor) -> torch.Tensor:
        bump = torch.zeros_like(out)
        bump[at] = delta
        return out + bump

    opt = torch.optim.Adam([delta], lr=lr)
    with _Frozen(model, delta):
        hook = down.register_forward_hook(add_delta)
        try:
            every = torch.arange(len(facts))
            for _ in range(steps):
                opt.zero_grad()
                decay = (delta.norm(dim=1) ** 2 / values.norm(dim=1) ** 2).mean()
                (_target_nll(model, enc, every) + weight_decay * decay).backward()
                opt.step()
                with torch.no_grad():
                    norm = delta.norm(dim=1, keepdim=True)
                    delta.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm)))
        finally:
            hook.remove()
    k, r = keys.double(), delta.detach().double()
    update = torch.linalg.solve(lam * moment + k.T @ k, k.T @ r).T  # the system is symmetric
    with torch.no_grad():
        weight.add_(update.to(weight.dtype))
    return _stored(weight, original, stored_dtype, started, layer), original


@torch.no_grad()
def restore(model: EngramModel, layer: int, original: torch.Tensor) -> None:
    _down_proj(model, layer).weight.copy_(original)
