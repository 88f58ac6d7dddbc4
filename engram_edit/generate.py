"""Text generation with an EngramModel: greedy or sampled, token by token, memory on or off.

No KV cache: the whole window is run again each step, which is fine for the small models this
tool trains and keeps Engram hashing and ShortConv trivially correct.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engram_edit.errors import BadInputError
from engram_edit.model import EngramModel
from engram_edit.tokenizer import EngramTokenizer


@dataclass
class GenerationSettings:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # sample from the k most likely tokens only
    seed: int | None = None
    memory: bool = True  # False ablates every Engram module
    stop_at_eos: bool = True

    def problems(self) -> list[str]:
        p = []
        if self.max_new_tokens < 0:
            p.append(f"--max-new-tokens: must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            p.append(f"--temperature: must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            p.append(f"--top-k: must be >= 1, got {self.top_k}")
        return p


@torch.no_grad()
def generate_ids(model: EngramModel, ids: list[int], settings: GenerationSettings,
                 eos_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time after the prompt ``ids``."""
    problems = settings.problems()
    if problems:
        raise BadInputError(problems)
    if not ids:
        raise BadInputError("the prompt is empty (it encodes to no tokens)")
    device = next(model.parameters()).device
    generator = None
    if settings.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(settings.seed if settings.seed is not None else 0)
    window = model.config.max_position_embeddings
    seq = list(ids)
    for _ in range(settings.max_new_tokens):
        x = torch.tensor([seq[-window:]], dtype=torch.long, device=device)
        logits = model(x, memory=settings.memory).logits[0, -1].float()
        if settings.temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / settings.temperature
            if settings.top_k is not None:
                kth = torch.topk(logits, min(settings.top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, -1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        if settings.stop_at_eos and eos_id is not None and nxt == eos_id:
            return
        seq.append(nxt)
        yield nxt


def generate_text(model: EngramModel, tokenizer: EngramTokenizer, prompt: str,
                  settings: GenerationSettings) -> Iterator[tuple[int, str]]:
    """Yield (token id, new text) per generated token; the texts join to the decoded
    completion. A token that ends inside a UTF-8 sequence yields "" until it completes."""
    ids = tokenizer.encode(prompt)
    new: list[int] = []
    emitted = ""
    for token in generate_ids(model, ids, settings, tokenizer.token_id("<eos>")):
        new.append(token)
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            yield token, ""
            continue
        yield token, text[len(emitted):]
        emitted = text
