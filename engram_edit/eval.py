"""Measurements on a model: teacher-forced scores of completions, and memory ablation.

Every metric is defined once, in the docstring of the function that computes it, with the
JSON key it is reported under. ``METRICS_VERSION`` changes whenever a definition does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engram_edit.errors import BadInputError
from engram_edit.model import EngramModel
from engram_edit.tokenizer import EngramTokenizer

METRICS_VERSION = 1


def scored_target(prompt: str, target: str) -> str:
    """The text scored after ``prompt``: a space is put before the target when neither side
    has whitespace at the seam (so "Princess of" + "Wales" scores " Wales")."""
    if prompt and not prompt[-1].isspace() and target and not target[0].isspace():
        return " " + target
    return target


@dataclass
class CompletionScores:
    logprob: np.ndarray  # [n] sum of the target tokens' log-probs, teacher forced
    greedy: np.ndarray  # [n] bool: greedy decoding would produce every target token
    tokens: np.ndarray  # [n] target length in tokens


@torch.no_grad()
def score_completions(model: EngramModel, tokenizer: EngramTokenizer, prompts: Sequence[str],
                      targets: Sequence[str], memory: bool = True,
                      batch_size: int = 64) -> CompletionScores:
    """Teacher-forced log P(target | prompt) and whether greedy decoding yields the target.

    Targets are taken as given (use ``scored_target`` first for a fact's answer). Sequences are
    right-padded, which a causal model never sees.
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    device = next(model.parameters()).device
    pairs = []
    for p, t in zip(prompts, targets, strict=True):
        pi, ti = tokenizer.encode(p), tokenizer.encode(t)
        if not pi or not ti:
            raise BadInputError(f"empty prompt or target: {p!r} -> {t!r}")
        pairs.append((pi, ti))
    logprob = np.zeros(len(pairs))
    greedy = np.zeros(len(pairs), dtype=bool)
    window = model.config.max_position_embeddings
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs = [(pi + ti)[-window:] for pi, ti in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        logp = F.log_softmax(model(ids.to(device), memory=memory).logits.float(), -1).cpu()
        for i, ((_, ti), s) in enumerate(zip(chunk, seqs, strict=True)):
            n = len(ti)
            pos = torch.arange(len(s) - n - 1, len(s) - 1)  # positions that predict the target
            target = torch.tensor(ti)
            logprob[start + i] = float(logp[i, pos, target].sum())
            greedy[start + i] = bool((logp[i, pos].argmax(-1) == target).all())
    return CompletionScores(logprob, greedy, np.array([len(t) for _, t in pairs]))


@dataclass
class AblationRow:
    name: str  # "facts" or "text"
    items: int
    top1_memory: float
    top1_no_memory: float
    loss_memory: float
    loss_no_memory: float

    @property
    def kept(self) -> float:
        """Share of top-1 accuracy kept when the memory is off."""
        return self.top1_no_memory / self.top1_memory if self.top1_memory else float("nan")


def read_probes(path: str | Path) -> tuple[list[str], list[str]]:
    """Prompts and targets of a probe file (JSONL with "prompt" and "target")."""
    path = Path(path)
    prompts, targets, problems = [], [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path}: cannot read ({err})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            prompts.append(str(rec["prompt"]))
            targets.append(str(rec["target"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            problems.append(f"{path}:{n}: not a JSON object with 'prompt' and 'target'")
    if problems:
        raise BadInputError(problems)
    if not prompts:
        raise BadInputError(f"{path}: no probes")
    return prompts, targets


def fact_ablation(model: EngramModel, tokenizer: EngramTokenizer, prompts: list[str],
                  targets: list[str]) -> AblationRow:
    """Key "facts": top-1 = share of prompts whose greedy continuation is the whole target;
    loss = mean per-token negative log-likelihood of the targets; memory on and off."""
    on = score_completions(model, tokenizer, prompts, targets, memory=True)
    off = score_completions(model, tokenizer, prompts, targets, memory=False)
    n_tokens = on.tokens.sum()
    return AblationRow("facts", len(prompts), float(on.greedy.mean()), float(off.greedy.mean()),
                       float(-on.logprob.sum() / n_tokens), float(-off.logprob.sum() / n_tokens))


@torch.no_grad()
def text_ablation(model: EngramModel, stream: np.ndarray, windows: int = 32,
                  seq_len: int = 256) -> AblationRow:
    """Key "text": next-token top-1 accuracy and mean loss over ``windows`` evenly spaced
    windows of held-out text, memory on and off."""
    device = next(model.parameters()).device
    usable = len(stream) - seq_len - 1
    if usable <= 0:
        raise BadInputError(f"held-out text has {len(stream)} tokens, fewer than one window")
    starts = np.linspace(0, usable, num=windows, dtype=np.int64)
    batch = torch.from_numpy(np.stack([np.asarray(stream[s:s + seq_len + 1], dtype=np.int64)
                                       for s in starts])).to(device)
    out = {}
    for memory in (True, False):
        top1 = loss = 0.0
        for chunk in batch.split(8):
            logits = model(chunk[:, :-1], memory=memory).logits.float()
            target = chunk[:, 1:]
            loss += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            top1 += (logits.argmax(-1) == target).sum().item()
        out[memory] = (top1 / (len(starts) * seq_len), loss / (len(starts) * seq_len))
    return AblationRow("text", windows * seq_len, out[True][0], out[False][0], out[True][1],
                       out[False][1])
