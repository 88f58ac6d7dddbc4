"""Building the corpus n-gram index: stream text files through the tokenizer, count the n-grams
of each order, and write the index file. The file format, reading it (``NgramIndex``) and the
corpus streaming shared with the reader are index.py's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engram_edit.checkpoint import MemoryFiles, ModelFiles
from engram_edit.errors import BadInputError
from engram_edit.fileio import atomic_write_bytes
from engram_edit.index import (
    INDEX_FORMAT,
    INDEX_VERSION,
    NUMPY_TYPES,
    IndexInfo,
    LayerLoad,
    NgramIndex,
    SourceFile,
    smallest_uint,
)
from engram_edit.index_corpus import TokenBatch, check_sources, document_batches
from engram_edit.tensorwrite import TensorEntry, safetensors_header

MERGE_ENTRIES = 16 << 20  # partial counts held per order before they are merged

Progress = Callable[[int, int], None]  # (bytes read, bytes in all inputs)


@dataclass
class BuildReport:
    info: IndexInfo
    layers: list[LayerLoad]
    seconds: float
    ngrams_per_second: float  # n-gram occurrences counted per second, reading and writing included


# --- counting -----------------------------------------------------------------------------------

def _ngrams_of(keys: np.ndarray, order: int, vocab: int) -> np.ndarray:
    """The inverse of ``ngram_keys``: ``[N, order]`` int64 ids."""
    if keys.dtype.kind == "V":
        return keys.view(">i8").reshape(-1, order).astype(np.int64)
    grams = np.empty((len(keys), order), np.int64)
    for j in range(order - 1, -1, -1):
        keys, grams[:, j] = np.divmod(keys, vocab)
    return grams


class _OrderCounter:
    """Distinct n-grams of one order with their counts, merged batch by batch."""

    def __init__(self, order: int, vocab: int):
        self.order, self.vocab = order, vocab
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending = 0
        self.occurrences = 0

    def add(self, keys: np.ndarray) -> None:
        """Count n-grams given as ``ngram_keys``."""
        uniq, counts = np.unique(keys, return_counts=True)
        self.parts.append((uniq, counts.astype(np.int64)))
        self.pending += len(uniq)
        self.occurrences += len(keys)
        if self.pending > MERGE_ENTRIES:
            self._merge()

    def _merge(self) -> None:
        if len(self.parts) > 1:
            keys = np.concatenate([k for k, _ in self.parts])
            counts = np.concatenate([c for _, c in self.parts])
            uniq, inverse = np.unique(keys, return_inverse=True)
            summed = np.bincount(inverse, weights=counts, minlength=len(uniq))
            self.parts = [(uniq, summed.astype(np.int64))]  # float64 is exact below 2**53
        self.pending = len(self.parts[0][0]) if self.parts else 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct n-grams ``[N, order]`` int64 in lexicographic order, and their counts."""
        self._merge()
        if not self.parts:
            return np.zeros((0, self.order), np.int64), np.zeros(0, np.int64)
        keys, counts = self.parts[0]
        return _ngrams_of(keys, self.order, self.vocab), counts


def _spelling(compression: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Per compressed id, its most often seen raw id (the lowest when tied or unseen)."""
    raw = np.arange(len(compression))
    by_group = np.lexsort((raw, -seen, compression))  # group, then most seen, then lowest id
    _, first = np.unique(compression[by_group], return_index=True)
    return raw[by_group[first]]


def build_index(corpus: Sequence[str | Path], files: ModelFiles | MemoryFiles,
                out: str | Path, min_count: int = 1,
                progress: Progress | None = None) -> BuildReport:
    """Count the n-grams of text files as the model's Engram layers see them, and write an index.

    Streams the files batch by batch through the tokenizer and the compression table; keeps the
    distinct n-grams of orders 2..max n-gram of the model with their counts (format: index.py's
    module docstring). The file is written atomically.

    Args:
        corpus (`Sequence[str | Path]`): JSONL files with a "text" field (.jsonl, .ndjson) or
            plain text files (one document per paragraph).
        files (`ModelFiles | MemoryFiles`): the model (or split memory) whose tokenizer and
            n-gram orders to use.
        out (`str | Path`): the index file to write; replaced if it exists.
        min_count (`int`, defaults to 1): keep only n-grams seen at least this often.
        progress (`Callable[[int, int], None] | None`): called after each batch with the bytes
            read so far and the bytes of all inputs.

    Returns:
        `BuildReport`: what the file holds, how crowded each layer's rows are, and the speed.

    Raises:
        BadInputError: a missing corpus file (all are listed), a line that is not UTF-8 or not
            a JSON object with a string "text", a min_count below 1.

    Example:
        >>> files = open_model("my-model")  # doctest: +SKIP
        >>> build_index(["train.jsonl"], files, "ngrams.safetensors").info.kept  # doctest: +SKIP
    """
    if min_count < 1:
        raise BadInputError(f"min_count must be at least 1, got {min_count}")
    paths = check_sources(corpus)
    started = time.perf_counter()
    tokenizer = files.tokenizer
    vocab = tokenizer.compressed_vocab_size
    counters = {n: _OrderCounter(n, vocab) for n in files.config.engram_orders}
    seen = np.zeros(tokenizer.vocab_size, np.int64)  # occurrences of each raw token
    total_bytes = sum(p.stat().st_size for p in paths)
    report = progress or (lambda done, total: None)
    documents, tokens, digests = 0, 0, []
    for texts, done in document_batches(paths, digests):
        batch = TokenBatch.encode(texts, tokenizer)
        for order, counter in counters.items():
            counter.add(batch.ngrams(order, vocab)[1])
        seen += np.bincount(batch.raw, minlength=len(seen))
        documents += len(texts)
        tokens += len(batch.raw)
        report(done, total_bytes)
    sources = [SourceFile(str(p), p.stat().st_size, d.hexdigest())
               for p, d in zip(paths, digests, strict=True)]
    id_type = smallest_uint(max(vocab - 1, 0))
    tensors = {"tokens.spelling": _spelling(tokenizer.compression, seen).astype(id_type)}
    occurrences, distinct = {}, {}
    for n, counter in counters.items():
        grams, counts = counter.result()
        occurrences[n], distinct[n] = counter.occurrences, len(counts)
        keep = counts >= min_count
        tensors[f"order.{n}.ngrams"] = np.ascontiguousarray(grams[keep].astype(id_type))
        kept = counts[keep]
        tensors[f"order.{n}.counts"] = kept.astype(smallest_uint(int(kept.max(initial=0))))
    metadata = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION,
        "compression_sha256": tokenizer.compression_sha256,
        "orders": json.dumps(list(counters)), "min_count": str(min_count),
        "documents": str(documents), "tokens": str(tokens),
        "occurrences": json.dumps(occurrences), "distinct": json.dumps(distinct),
        "sources": json.dumps([vars(s) for s in sources]),
    }
    atomic_write_bytes(out, _safetensors_bytes(tensors, metadata))
    index = NgramIndex.open(out, files)
    seconds = time.perf_counter() - started
    return BuildReport(index.info, index.layer_loads(), seconds,
                       sum(occurrences.values()) / max(seconds, 1e-9))


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The whole file; unlike ``safetensors.numpy.save``, whose ``__metadata__`` key order
    changes from run to run, the same input always gives the same bytes."""
    codes = {np.dtype(v): k for k, v in NUMPY_TYPES.items()}
    entries = [TensorEntry(name, codes[a.dtype], a.shape) for name, a in tensors.items()]
    head, offsets = safetensors_header(entries, dict(sorted(metadata.items())))
    order = sorted(tensors, key=lambda name: offsets[name])
    return head + b"".join(np.ascontiguousarray(tensors[n], tensors[n].dtype.newbyteorder("<"))
                           .tobytes() for n in order)
