"""EngramTokenizer: a ``tokenizers`` tokenizer plus the Engram compression table.

Implements docs/engram.md section 1 to the letter. The table is rebuilt from ``tokenizer.json``
(never stored in a model), cached in the user cache directory under the file's sha256.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers

from engram_edit.errors import BadInputError
from engram_edit.paths import cache_dir

_PLACEHOLDER = "\ue000"  # keeps a lone space alive through Strip


def compression_normalizer() -> normalizers.Normalizer:
    """The normalizer chain whose output is a token's compression key (spec section 1)."""
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _PLACEHOLDER),
        normalizers.Strip(),
        normalizers.Replace(_PLACEHOLDER, " "),
    ])


def build_compression(tokenizer: Tokenizer) -> np.ndarray:
    """int64 table raw id -> compressed id, ids assigned by first appearance of each key."""
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    texts = tokenizer.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
    norm = compression_normalizer()
    table = np.empty(vocab, dtype=np.int64)
    ids: dict[str, int] = {}
    for raw, text in enumerate(texts):
        if "\ufffd" in text:  # a partial UTF-8 sequence: the raw token string keeps it distinct
            key = tokenizer.id_to_token(raw)
        else:
            key = norm.normalize_str(text) or text
        table[raw] = ids.setdefault(key, len(ids))
    return table


def _cached_compression(tokenizer: Tokenizer, sha256: str) -> np.ndarray:
    path = cache_dir() / "compression" / f"{sha256}.npy"
    try:
        return np.load(path)
    except (OSError, ValueError):
        pass
    table = build_compression(tokenizer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, table)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:  # a read-only cache costs time, not correctness
        pass
    return table


class EngramTokenizer:
    """Text <-> raw ids, and raw ids -> compressed ids for hashing."""

    def __init__(self, tokenizer: Tokenizer, compression: np.ndarray, sha256: str = ""):
        self.tokenizer = tokenizer
        self.compression = compression
        self.sha256 = sha256

    @classmethod
    def from_file(cls, path: str | Path, use_cache: bool = True) -> EngramTokenizer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadInputError(f"{path}: file not found") from None
        except OSError as err:
            raise BadInputError(f"{path}: cannot read ({err.strerror})") from None
        try:
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # tokenizers raises plain Exception on a bad file
            raise BadInputError(f"{path}: not a valid tokenizers file ({err})") from None
        sha = hashlib.sha256(data).hexdigest()
        table = _cached_compression(tokenizer, sha) if use_cache else build_compression(tokenizer)
        return cls(tokenizer, table, sha)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> EngramTokenizer:
        return cls(tokenizer, build_compression(tokenizer))

    @property
    def vocab_size(self) -> int:
        return len(self.compression)

    @cached_property
    def compressed_vocab_size(self) -> int:
        return int(self.compression.max()) + 1 if len(self.compression) else 0

    @cached_property
    def compression_sha256(self) -> str:
        """sha256 of the table as int64 little-endian bytes (part of the memory fingerprint)."""
        return hashlib.sha256(self.compression.astype("<i8").tobytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Raw ids of ``text`` as the model sees it: no special tokens added, nothing stripped."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def compress(self, ids: list[int] | np.ndarray) -> np.ndarray:
        return self.compression[np.asarray(ids, dtype=np.int64)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_text(self, raw_id: int) -> str:
        """The text one token decodes to (special tokens included)."""
        return self.tokenizer.decode([int(raw_id)], skip_special_tokens=False)

    def merged_with(self, compressed_id: int) -> list[int]:
        """Every raw id that shares ``compressed_id``."""
        return np.flatnonzero(self.compression == compressed_id).tolist()

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)
