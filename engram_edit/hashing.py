"""NgramHasher: multipliers, primes, row offsets and the n-gram hash of docs/engram.md sections 2-4.

Pure functions of (config, compressed vocab size, pad id, ids); no I/O. numpy is the reference;
torch tensors (CPU or CUDA) go through the same algorithm and give bit-identical int64 results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engram_edit.config import EngramConfig

if TYPE_CHECKING:
    from engram_edit.tokenizer import EngramTokenizer

INT64_MAX = 2**63 - 1


def layer_multipliers(layer_id: int, max_ngram: int, compressed_vocab_size: int,
                      seed: int) -> np.ndarray:
    """Odd int64 multipliers of one layer; any ``id * m`` stays below 2**63 (spec section 2)."""
    half = max(1, INT64_MAX // compressed_vocab_size // 2)
    rng = np.random.default_rng(seed + 10007 * layer_id)
    return rng.integers(0, half, size=max_ngram, dtype=np.int64) * 2 + 1


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    # Miller-Rabin with these bases is exact for every n < 3.3e24.
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def model_primes(config: EngramConfig) -> dict[int, np.ndarray]:
    """Table size of every column of every Engram layer, in column order (spec section 3)."""
    seen: set[int] = set()
    out: dict[int, np.ndarray] = {}
    for layer_id in config.engram_layer_ids:
        primes: list[int] = []
        for size in config.engram_vocab_sizes:
            candidate = size - 1
            for _ in range(config.engram_n_heads):
                candidate += 1
                while not _is_prime(candidate) or candidate in seen:
                    candidate += 1
                seen.add(candidate)
                primes.append(candidate)
        out[layer_id] = np.array(primes, dtype=np.int64)
    return out


def _backend(ids: Any) -> tuple[Any, bool]:
    if isinstance(ids, np.ndarray):
        return np, False
    import torch

    if isinstance(ids, torch.Tensor):
        return torch, True
    raise TypeError(f"ids must be a numpy array or a torch tensor, got {type(ids).__name__}")


class NgramHasher:
    """Maps compressed token ids to slots and global table rows of every Engram layer."""

    def __init__(self, config: EngramConfig, compressed_vocab_size: int, pad_id: int):
        self.layer_ids = list(config.engram_layer_ids)
        self.max_ngram = config.engram_max_ngram_size
        self.n_heads = config.engram_n_heads
        self.pad_id = int(pad_id)
        self.compressed_vocab_size = int(compressed_vocab_size)
        self.multipliers = {
            lid: layer_multipliers(lid, self.max_ngram, compressed_vocab_size, config.engram_seed)
            for lid in self.layer_ids
        }
        self.primes = model_primes(config)
        self.offsets = {lid: np.concatenate([[0], np.cumsum(p)[:-1]]).astype(np.int64)
                        for lid, p in self.primes.items()}
        self.rows_per_layer = {lid: int(p.sum()) for lid, p in self.primes.items()}
        self._device_cache: dict[Any, dict[str, dict[int, Any]]] = {}

    @classmethod
    def for_tokenizer(cls, config: EngramConfig, tokenizer: EngramTokenizer) -> NgramHasher:
        pad = int(tokenizer.compression[config.engram_pad_token_id])
        return cls(config, tokenizer.compressed_vocab_size, pad)

    @property
    def columns(self) -> int:
        return (self.max_ngram - 1) * self.n_heads

    def column(self, order: int, head: int) -> int:
        return (order - 2) * self.n_heads + head

    def column_order_head(self, column: int) -> tuple[int, int]:
        return column // self.n_heads + 2, column % self.n_heads

    def _constants(self, xp: Any, like: Any) -> dict[str, dict[int, Any]]:
        if xp is np:
            return {"multipliers": self.multipliers, "primes": self.primes,
                    "offsets": self.offsets}
        key = like.device
        if key not in self._device_cache:
            self._device_cache[key] = {
                name: {lid: xp.from_numpy(a).to(key) for lid, a in table.items()}
                for name, table in (("multipliers", self.multipliers), ("primes", self.primes),
                                    ("offsets", self.offsets))
            }
        return self._device_cache[key]

    def slots(self, compressed_ids: Any) -> dict[int, Any]:
        """Slot (row within its column) per layer: ids [..., T] -> int64 [..., T, columns]."""
        xp, is_torch = _backend(compressed_ids)
        ids = compressed_ids.long() if is_torch else compressed_ids.astype(np.int64, copy=False)
        consts = self._constants(xp, ids)
        t = ids.shape[-1]
        shifted = [ids]
        for k in range(1, self.max_ngram):  # s_k[t] = ids[t - k], pad before the start
            pad = xp.full_like(ids[..., : min(k, t)], self.pad_id)
            shifted.append(xp.concatenate([pad, ids[..., : max(t - k, 0)]], -1)
                           if not is_torch else xp.cat([pad, ids[..., : max(t - k, 0)]], -1))
        out = {}
        for lid in self.layer_ids:
            m = consts["multipliers"][lid]
            primes = consts["primes"][lid]
            mix = shifted[0] * m[0]
            cols = []
            for n in range(2, self.max_ngram + 1):
                mix = mix ^ (shifted[n - 1] * m[n - 1])
                start = (n - 2) * self.n_heads
                cols.append(mix[..., None] % primes[start:start + self.n_heads])
            out[lid] = xp.concatenate(cols, -1) if not is_torch else xp.cat(cols, -1)
        return out

    def rows(self, compressed_ids: Any) -> dict[int, Any]:
        """Global row in each layer's single table: slot + the column's offset."""
        xp, _ = _backend(compressed_ids)
        consts = self._constants(xp, compressed_ids)
        return {lid: s + consts["offsets"][lid] for lid, s in self.slots(compressed_ids).items()}

    def locate(self, layer_id: int, row: int) -> tuple[int, int]:
        """(column, slot) of a global row of one layer."""
        offsets = self.offsets[layer_id]
        if not 0 <= row < self.rows_per_layer[layer_id]:
            raise IndexError(row)
        column = int(np.searchsorted(offsets, row, side="right") - 1)
        return column, int(row - offsets[column])


@dataclass
class NgramHashes:
    """One n-gram ending at ``position``: its tokens and, per column of its order, slot and row."""

    layer_id: int
    position: int  # index of the n-gram's last token in the text's token list
    order: int
    raw_ids: list[int]  # the raw pad id stands where the n-gram reaches before the text
    padded: bool  # the n-gram reaches back before the text
    tokens: list[str]
    columns: list[int]
    slots: list[int]
    rows: list[int]


@dataclass
class TextHashes:
    text: str
    raw_ids: list[int]
    compressed_ids: list[int]
    ngrams: list[NgramHashes]


def explain(text: str, tokenizer: EngramTokenizer, hasher: NgramHasher,
            pad_token_id: int) -> TextHashes:
    """Every n-gram of ``text`` as token strings, with the slot and global row of each head."""
    raw = tokenizer.encode(text)
    cids = tokenizer.compress(raw)
    slots = hasher.slots(cids[None, :])
    rows = hasher.rows(cids[None, :])
    ngrams = []
    for lid in hasher.layer_ids:
        for pos in range(len(raw)):
            for order in range(2, hasher.max_ngram + 1):
                first = pos - order + 1
                ids = [raw[i] if i >= 0 else pad_token_id for i in range(first, pos + 1)]
                cols = [hasher.column(order, h) for h in range(hasher.n_heads)]
                ngrams.append(NgramHashes(
                    layer_id=lid, position=pos, order=order, raw_ids=ids, padded=first < 0,
                    tokens=[tokenizer.token_text(i) for i in ids], columns=cols,
                    slots=[int(slots[lid][0, pos, c]) for c in cols],
                    rows=[int(rows[lid][0, pos, c]) for c in cols]))
    return TextHashes(text, raw, cids.tolist(), ngrams)
