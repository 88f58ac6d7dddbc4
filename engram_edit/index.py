"""Corpus n-gram index: the file format, and reading it (``NgramIndex``: which n-grams share each
table row). Building the file is index_build.py's; the corpus streaming both halves use
(documents, n-gram keys, tokenized batches) is index_corpus.py's. Row search is search.py's;
tokenizing and hashing are tokenizer.py's and hashing.py's, editing is edit/'s. docs/engram.md
sections 1-5.

Index file, version 1 (``ngram-index.safetensors``)
---------------------------------------------------
A safetensors file (8-byte little-endian header length, JSON header, byte buffer) with two
tensors per n-gram order ``n`` in ``orders``:

- ``order.{n}.ngrams``: U16 (compressed vocab <= 65,536) or U32, shape ``[N_n, n]``. The distinct
  n-grams as compressed token ids, oldest token first, in strictly increasing lexicographic
  order (no repeats).
- ``order.{n}.counts``: the smallest of U8/U16/U32/U64 that holds the largest count, shape
  ``[N_n]``. How often each n-gram occurs in the corpus; every count is >= ``min_count``.

and ``tokens.spelling``, U16 or U32 ``[compressed vocab]``: for each compressed id, the raw token
id seen most often in the corpus (the lowest raw id when tied or unseen). Compression merges
" c" with "c" and "The" with "the"; this is only used to print n-grams as the corpus spells them.

``__metadata__`` (strings only): ``format`` = "engram-ngram-index", ``version`` = "1",
``compression_sha256`` (of the tokenizer's compression table, docs/engram.md section 1), ``orders``
(JSON list), ``min_count``, ``documents``, ``tokens``, ``occurrences`` and ``distinct`` (JSON
objects order -> number, counted before the ``min_count`` cut) and ``sources`` (JSON list of
``{"path", "bytes", "sha256"}``, one per input file).

Notes:
- What is counted: every run of ``n`` consecutive tokens inside one document. N-grams that reach
  before a document's start (hashed with the pad id) or across two documents are not: how a
  trainer packs documents is the trainer's choice (docs/engram.md section 4).
- A document is one JSONL line's ``"text"`` (files ending in .jsonl or .ndjson), or one
  paragraph of any other file (text between blank lines, inner line breaks kept;
  index_corpus.py).
- Slots are not stored. The slot of an n-gram in a column is a pure function of its ids and the
  hashing config (docs/engram.md section 4), so the view per layer and column is hashed from the
  stored n-grams when first asked for (one batched pass per order, then cached). Storing it would
  cost 4 bytes per n-gram per column per layer, 8x the n-grams themselves for the bundled model, and
  would tie the file to one seed and table size: as it is, one index serves every model whose
  tokenizer compresses the same way, which is what ``compression_sha256`` checks.
- Empty orders are ``[0, n]`` tensors. Unknown metadata keys are ignored. Integers are
  little-endian. The header is split.py's ``safetensors_header`` with the metadata keys sorted,
  so the same corpus and tokenizer always give the same bytes.

Why safetensors and not SQLite or npz: it opens by reading the header alone, and each array is
memory-mapped at its offset, so a count lookup touches a few pages (binary search over the
sorted n-grams). The format fits on one screen and the project already reads it by offset
(tensorfile.py). SQLite would store each n-gram as a B-tree row with its own header, several
times the bytes of a packed uint16 array; compressed npz members cannot be memory-mapped.

"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from engram_edit.checkpoint import MemoryFiles, ModelFiles
from engram_edit.errors import BadInputError, MismatchError
from engram_edit.fileio import atomic_path
from engram_edit.index_corpus import TokenBatch, check_sources, document_batches, ngram_keys
from engram_edit.paths import cache_dir
from engram_edit.tensorfile import TensorLocation, read_header
from engram_edit.tokenizer import compression_normalizer

INDEX_FORMAT = "engram-ngram-index"
INDEX_VERSION = "1"
INDEX_FILE = "ngram-index.safetensors"
SEARCH_BATCH_CHARS = 256 << 10  # smaller when looking for text: the search may stop early
HASH_CHUNK = 1 << 17  # n-grams hashed per call when a slot view is built
# safetensors dtype code -> numpy type, for the unsigned integers an index file holds
NUMPY_TYPES = {"U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64}


def bundled_index_file() -> Path:
    """The bundled model's index of its own training corpus (package data)."""
    return Path(__file__).resolve().parent / "bundled" / "index" / INDEX_FILE


def own_index_file(files: ModelFiles | MemoryFiles) -> Path:
    """Where ``engram-edit index`` writes a model's index by default: its ``.engram/`` folder."""
    home = files.memory_dir if isinstance(files, ModelFiles) else files.path
    return home / ".engram" / INDEX_FILE


class Sharer(NamedTuple):
    text: str  # the n-gram as the hash sees it: decoded, then the compression normal form
    count: int  # occurrences in the indexed corpus


class SlotLoad(NamedTuple):
    ngrams: int  # distinct indexed n-grams that read this row
    occurrences: int  # their occurrences in the corpus, summed


@dataclass
class SourceFile:
    path: str
    bytes: int
    sha256: str


@dataclass
class IndexInfo:
    path: str
    compression_sha256: str
    orders: list[int]
    min_count: int
    documents: int
    tokens: int
    occurrences: dict[int, int]  # n-grams seen per order, before the min_count cut
    distinct: dict[int, int]  # distinct n-grams per order, before the cut
    kept: dict[int, int]  # distinct n-grams per order in the file
    sources: list[SourceFile]
    nbytes: int  # size of the index file


@dataclass
class LayerLoad:
    """How crowded one layer's rows are, counting the indexed n-grams only."""

    layer_id: int
    rows: int
    used: int  # rows read by at least one n-gram
    shared: int  # rows read by two or more
    max_ngrams: int  # the most n-grams on one row
    mean_ngrams: float  # n-grams per used row


def smallest_uint(largest: int) -> type:
    """The smallest numpy unsigned integer type that holds ``largest``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(dtype).max:
            return dtype
    return np.uint64


# --- the opened index ---------------------------------------------------------------------------

def _memmap(loc: TensorLocation) -> np.ndarray:
    dtype = np.dtype(NUMPY_TYPES[loc.dtype]).newbyteorder("<")
    if loc.numel == 0:
        return np.zeros(loc.shape, dtype)
    return np.memmap(loc.path, dtype=dtype, mode="r", offset=loc.offset, shape=loc.shape)


class _SortedRows:
    """Rows of a sorted ``[N, n]`` array as tuples, for ``bisect`` (reads O(log N) rows)."""

    def __init__(self, grams: np.ndarray):
        self.grams = grams

    def __len__(self) -> int:
        return len(self.grams)

    def __getitem__(self, i: int) -> tuple[int, ...]:
        return tuple(self.grams[i].tolist())


def _meta_json(meta: dict[str, str], key: str, source: Path) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError):
        raise BadInputError(f"{source}: __metadata__ {key!r} is missing or not JSON") from None


class RowMembers(NamedTuple):
    """The indexed n-grams on some rows of one layer, flat: row ``rows[i]``'s are entries
    ``starts[i]:starts[i + 1]``, the most frequent first (ties: lexicographic)."""

    rows: np.ndarray  # sorted row ids
    starts: np.ndarray  # [len(rows) + 1]
    order: np.ndarray  # per entry: the n-gram's order
    gram: np.ndarray  # per entry: its index among the indexed n-grams of that order
    count: np.ndarray  # per entry: its corpus occurrences
    ids: np.ndarray  # per entry: its compressed ids, oldest first, -1 past its order


class NgramIndex:
    """An index file opened against a model: counts, and which n-grams read each row.

    Opening reads the header only; the arrays are memory-mapped. The slot view of an order is
    hashed on first use (``HASH_CHUNK`` n-grams at a time) and cached for every layer.
    """

    def __init__(self, path: Path, info: IndexInfo, grams: dict[int, np.ndarray],
                 counts: dict[int, np.ndarray], spelling: np.ndarray,
                 files: ModelFiles | MemoryFiles):
        self.path, self.info, self.grams, self.counts = path, info, grams, counts
        self.spelling = np.asarray(spelling, np.int64)
        self.tokenizer = files.tokenizer
        self.hasher = files.hasher
        self._slots: dict[tuple[int, int], np.ndarray] = {}  # (layer, order) -> [N, heads]

    @classmethod
    def open(cls, path: str | Path, files: ModelFiles | MemoryFiles) -> NgramIndex:
        """Open an index file for the model (or memory) ``files``.

        Raises:
            BadInputError: not an index file, or a damaged one (each problem named).
            MismatchError: the index was built with a tokenizer that compresses differently,
                or lacks an n-gram order the model hashes.
        """
        path = Path(path)
        header = read_header(path)
        meta = header.metadata
        if meta.get("format") != INDEX_FORMAT:
            raise BadInputError(f"{path}: not an n-gram index (format is not {INDEX_FORMAT!r})")
        if meta.get("version") != INDEX_VERSION:
            raise BadInputError(f"{path}: index version {meta.get('version')!r}; this "
                                f"engram-edit reads version {INDEX_VERSION} (rebuild it with "
                                f"`engram-edit index`)")
        orders = [int(n) for n in _meta_json(meta, "orders", path)]
        grams, counts, problems = {}, {}, []
        for n in orders:
            g = header.tensors.get(f"order.{n}.ngrams")
            c = header.tensors.get(f"order.{n}.counts")
            if g is None or c is None:
                problems.append(f"{path}: order {n}: tensors order.{n}.ngrams and "
                                f"order.{n}.counts are required")
            elif g.dtype not in NUMPY_TYPES or c.dtype not in NUMPY_TYPES:
                problems.append(f"{path}: order {n}: ids and counts must be unsigned integers")
            elif len(g.shape) != 2 or g.shape[1] != n or c.shape != (g.shape[0],):
                problems.append(f"{path}: order {n}: shapes {list(g.shape)} and "
                                f"{list(c.shape)} do not fit [N, {n}] and [N]")
            else:
                grams[n], counts[n] = _memmap(g), _memmap(c)
        spelling = header.tensors.get("tokens.spelling")
        if spelling is None or spelling.dtype not in NUMPY_TYPES or len(spelling.shape) != 1:
            problems.append(f"{path}: tokens.spelling: missing, or not an unsigned [vocab] "
                            f"tensor")
        if problems:
            raise BadInputError(problems)
        tokenizer = files.tokenizer
        if meta.get("compression_sha256") != tokenizer.compression_sha256:
            problems.append(f"{path}: built with another tokenizer (compression table sha256 "
                            f"{str(meta.get('compression_sha256'))[:12]}, the model's is "
                            f"{tokenizer.compression_sha256[:12]}); rebuild it with "
                            f"`engram-edit index`")
        missing = sorted(set(files.config.engram_orders) - set(orders))
        if missing:
            problems.append(f"{path}: holds n-gram orders {orders}, the model also hashes "
                            f"{missing}; rebuild it with `engram-edit index`")
        if problems:
            raise MismatchError(problems)

        def per_order(key: str) -> dict[int, int]:
            return {int(k): int(v) for k, v in _meta_json(meta, key, path).items()}

        info = IndexInfo(
            str(path), meta["compression_sha256"], orders, int(_meta_json(meta, "min_count", path)),
            int(_meta_json(meta, "documents", path)), int(_meta_json(meta, "tokens", path)),
            per_order("occurrences"), per_order("distinct"),
            {n: len(counts[n]) for n in orders},
            [SourceFile(**s) for s in _meta_json(meta, "sources", path)], header.file_size)
        return cls(path, info, grams, counts, _memmap(spelling), files)

    # --- n-grams --------------------------------------------------------------------------------
    def ngram_ids(self, text: str) -> tuple[int, ...]:
        """The compressed ids of ``text`` as one n-gram (encoded without special tokens)."""
        ids = self.tokenizer.compress(self.tokenizer.encode(text)).tolist()
        if not 2 <= len(ids) <= max(self.info.orders):
            raise BadInputError(f"{text!r} is {len(ids)} token(s); an indexed n-gram has "
                                f"{min(self.info.orders)} to {max(self.info.orders)}")
        return tuple(ids)

    def ngram_text(self, ids: Sequence[int]) -> str:
        """An n-gram of compressed ids as text: each id's most common spelling in the corpus,
        decoded, then put in the compression normal form (lowercase, outer spaces stripped)."""
        text = self.tokenizer.decode(self.spelling[np.asarray(ids, np.int64)].tolist())
        return compression_normalizer().normalize_str(text) or text

    def ngram_count(self, ngram: str | Sequence[int]) -> int:
        """Occurrences of one n-gram in the corpus: text, or compressed ids (0 when absent, or
        when it was cut by ``min_count``). Reads O(log N) rows of the file."""
        ids = self.ngram_ids(ngram) if isinstance(ngram, str) else tuple(int(i) for i in ngram)
        if len(ids) not in self.grams:
            raise BadInputError(f"the index holds n-grams of {self.info.orders} tokens, "
                                f"not {len(ids)}")
        rows = _SortedRows(self.grams[len(ids)])
        at = bisect.bisect_left(rows, ids)
        return int(self.counts[len(ids)][at]) if at < len(rows) and rows[at] == ids else 0

    # --- slots ----------------------------------------------------------------------------------
    def _slots_cache_file(self, layer_id: int, order: int) -> Path:
        """Where the slots of one (layer, order) are kept between runs: the user cache, keyed
        by the index file's identity and everything that decides a slot."""
        h = self.hasher
        stat = Path(self.path).stat()
        key = hashlib.sha256(
            f"{Path(self.path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{layer_id}:{order}:"
            f"{h.pad_id}".encode() + h.multipliers[layer_id].tobytes()
            + h.primes[layer_id].tobytes()).hexdigest()[:32]
        return cache_dir() / "index-slots" / f"{key}.npy"

    def order_slots(self, layer_id: int, order: int) -> np.ndarray:
        """Slot of every indexed n-gram of ``order`` in each head's column: ``[N, heads]``.

        Hashing every indexed n-gram takes about a second on the bundled index, so the result
        is cached on disk (memory-mapped on later runs)."""
        key = (layer_id, order)
        if key not in self._slots:
            cached = self._slots_cache_file(layer_id, order)
            try:
                self._slots[key] = np.load(cached, mmap_mode="r")
                return self._slots[key]
            except (OSError, ValueError):
                pass
            h = self.hasher
            cols = [h.column(order, j) for j in range(h.n_heads)]
            grams = self.grams[order]
            slot_type = smallest_uint(max(int(p.max()) for p in h.primes.values()))
            out = {lid: np.empty((len(grams), h.n_heads), slot_type) for lid in h.layer_ids}
            for a in range(0, len(grams), HASH_CHUNK):
                chunk = np.asarray(grams[a:a + HASH_CHUNK], np.int64)
                for lid, slots in h.slots(chunk).items():  # [M, order, columns]
                    out[lid][a:a + len(chunk)] = slots[:, order - 1, cols]
            self._slots.update({(lid, order): s for lid, s in out.items()})
            for lid, slots in out.items():
                try:
                    with atomic_path(self._slots_cache_file(lid, order)) as tmp, \
                            open(tmp, "wb") as f:
                        np.save(f, slots)
                except OSError:  # a read-only cache costs time, not correctness
                    pass
        return self._slots[key]

    def _locate(self, layer_id: int, row: int) -> tuple[int, int]:
        """(column, slot) of global ``row`` of a layer, both checked."""
        h = self.hasher
        if layer_id not in h.layer_ids:
            raise BadInputError(f"layer {layer_id} is not an Engram layer (Engram layers: "
                                f"{h.layer_ids})")
        try:
            return h.locate(layer_id, row)
        except IndexError:
            raise BadInputError(f"row {row} is out of range for layer {layer_id} "
                                f"({h.rows_per_layer[layer_id]} rows)") from None

    def _members(self, layer_id: int, row: int) -> tuple[int, np.ndarray]:
        """(order, indices of its indexed n-grams) that read global ``row`` of a layer."""
        column, slot = self._locate(layer_id, row)
        order, head = self.hasher.column_order_head(column)
        return order, np.flatnonzero(self.order_slots(layer_id, order)[:, head] == slot)

    def members(self, layer_id: int, row: int) -> list[tuple[tuple[int, ...], int]]:
        """(compressed ids, count) of every indexed n-gram that reads a row, most frequent
        first (ties: lexicographic)."""
        return self.members_of(layer_id, [row])[row]

    def members_of(self, layer_id: int, rows: Iterable[int]
                   ) -> dict[int, list[tuple[tuple[int, ...], int]]]:
        """``members`` of many rows of one layer at once (``row_members`` as tuples)."""
        m = self.row_members(layer_id, rows)
        grams = [tuple(g[:o]) for g, o in zip(m.ids.tolist(), m.order.tolist(), strict=True)]
        counts = m.count.tolist()
        return {row: list(zip(grams[a:b], counts[a:b], strict=True))
                for row, a, b in zip(m.rows.tolist(), m.starts[:-1].tolist(),
                                     m.starts[1:].tolist(), strict=True)}

    def row_members(self, layer_id: int, rows: Iterable[int]) -> RowMembers:
        """Every indexed n-gram that reads any of ``rows`` of one layer, as flat arrays: one
        pass over the indexed n-grams per (order, head) for all rows."""
        h = self.hasher
        width = max(self.info.orders)
        by_column: dict[int, dict[int, int]] = {}  # column -> slot -> row
        for row in set(int(r) for r in rows):
            column, slot = self._locate(layer_id, row)
            by_column.setdefault(column, {})[slot] = row
        parts = []  # (row, order, gram, count, ids) per column
        for column, slot_rows in by_column.items():
            order, head = h.column_order_head(column)
            slots = np.asarray(self.order_slots(layer_id, order)[:, head], np.int64)
            wanted = np.full(int(h.primes[layer_id][column]), -1, np.int64)  # slot -> row
            wanted[list(slot_rows)] = list(slot_rows.values())
            hit = np.flatnonzero(wanted[slots] >= 0)
            ids = np.full((len(hit), width), -1, np.int64)
            ids[:, :order] = self.grams[order][hit]
            parts.append((wanted[slots[hit]], np.full(len(hit), order), hit,
                          np.asarray(self.counts[order][hit], np.int64), ids))
        if not parts:
            parts = [(*(np.zeros(0, np.int64),) * 4, np.zeros((0, width), np.int64))]
        row, order, gram, count, ids = (np.concatenate([p[i] for p in parts]) for i in range(5))
        ranked = np.lexsort((gram, -count, row))  # by row, most frequent first, lexicographic
        all_rows = np.array(sorted({r for c in by_column.values() for r in c.values()}),
                            dtype=np.int64)
        starts = np.searchsorted(row[ranked], np.append(all_rows, np.iinfo(np.int64).max))
        return RowMembers(all_rows, starts, order[ranked], gram[ranked], count[ranked],
                          ids[ranked])

    def sharers(self, layer_id: int, row: int, top_k: int | None = None,
                exclude: Iterable[Sequence[int]] = ()) -> list[Sharer]:
        """The indexed n-grams that read a row, most frequent first (ties: lexicographic).

        Args:
            layer_id (`int`): an Engram layer.
            row (`int`): global row in that layer's table.
            top_k (`int | None`): at most this many; all when None.
            exclude (`Iterable[Sequence[int]]`): n-grams (compressed ids, e.g. from
                ``ngram_ids``) to leave out, such as the one being edited.

        Returns:
            `list[Sharer]`: (text, count) pairs.

        Example:
            >>> index.sharers(0, 51234, top_k=3)  # doctest: +SKIP
            [Sharer(text='the ottoman', count=412), ...]
        """
        skip = {tuple(int(i) for i in g) for g in exclude}
        kept = [(g, c) for g, c in self.members(layer_id, row) if g not in skip]
        return [Sharer(self.ngram_text(g), c) for g, c in kept[:top_k]]

    def rows_of(self, layer_id: int, ids: Sequence[int]) -> list[int]:
        """The global row each head of a layer reads for one n-gram (compressed ids)."""
        h = self.hasher
        rows = h.rows(np.asarray(ids, np.int64)[None, :])[layer_id][0, -1]
        return [int(rows[h.column(len(ids), j)]) for j in range(h.n_heads)]

    def slot_load(self, layer_id: int, row: int) -> SlotLoad:
        """How many indexed n-grams read a row, and how often they occur together."""
        order, members = self._members(layer_id, row)
        return SlotLoad(len(members), int(np.asarray(self.counts[order][members]).sum()))

    def slot_loads(self, layer_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``slot_load`` of every row of a layer at once: (n-grams, occurrences), int64 each."""
        h = self.hasher
        size = h.rows_per_layer[layer_id]
        ngrams, occurrences = np.zeros(size, np.int64), np.zeros(size, np.int64)
        for order in self.info.orders:
            if order > h.max_ngram:
                continue
            slots = self.order_slots(layer_id, order)
            counts = np.asarray(self.counts[order], np.float64)
            for j in range(h.n_heads):
                rows = slots[:, j].astype(np.int64) + h.offsets[layer_id][h.column(order, j)]
                ngrams += np.bincount(rows, minlength=size)
                occurrences += np.bincount(rows, weights=counts, minlength=size).astype(np.int64)
        return ngrams, occurrences

    def layer_loads(self) -> list[LayerLoad]:
        """How crowded each Engram layer's rows are."""
        out = []
        for lid in self.hasher.layer_ids:
            ngrams, _ = self.slot_loads(lid)
            used = int((ngrams > 0).sum())
            out.append(LayerLoad(lid, len(ngrams), used, int((ngrams > 1).sum()),
                                 int(ngrams.max(initial=0)), float(ngrams.sum() / max(used, 1))))
        return out

    # --- corpus text ----------------------------------------------------------------------------
    def sample_contexts(self, ngrams: Iterable[Sequence[int]],
                        corpus: Sequence[str | Path] | None = None, per_ngram: int = 2,
                        context_tokens: int = 32) -> dict[tuple[int, ...], list[str]]:
        """Corpus text that ends with each n-gram: prompts whose next-token prediction reads the
        n-gram's rows (for the locality term of an edit).

        Streams ``corpus`` (default: the index's own sources) batch by batch and stops once
        every n-gram has ``per_ngram`` texts. Each text is the n-gram with up to
        ``context_tokens`` tokens of its document before it, decoded.

        Args:
            ngrams (`Iterable[Sequence[int]]`): compressed ids, e.g. from ``ngram_ids``.
            corpus (`Sequence[str | Path] | None`): files to read, in the formats of
                ``build_index``.
            per_ngram (`int`, defaults to 2): texts wanted per n-gram.
            context_tokens (`int`, defaults to 32): tokens kept before each n-gram.

        Returns:
            `dict[tuple[int, ...], list[str]]`: per n-gram, its texts in corpus order (fewer
            than ``per_ngram`` when the corpus has fewer).

        Raises:
            BadInputError: no corpus given and the index's sources are gone, or a missing file.
        """
        wanted: dict[tuple[int, ...], list[str]] = {tuple(int(i) for i in g): [] for g in ngrams}
        if not wanted:
            return wanted
        if corpus is None:
            corpus = [s.path for s in self.info.sources if Path(s.path).is_file()]
            if not corpus:
                raise BadInputError(f"{self.path}: its corpus files are gone "
                                    f"({', '.join(s.path for s in self.info.sources)}); "
                                    f"pass corpus files")
        vocab = self.tokenizer.compressed_vocab_size
        orders = sorted({len(g) for g in wanted})
        for texts, _ in document_batches(check_sources(corpus), chars_per_batch=SEARCH_BATCH_CHARS):
            batch = TokenBatch.encode(texts, self.tokenizer)
            for n in orders:
                open_ = [g for g in wanted if len(g) == n and len(wanted[g]) < per_ngram]
                if not open_:
                    continue
                ends, keys = batch.ngrams(n, vocab)
                hits = np.flatnonzero(np.isin(keys, ngram_keys(np.array(open_).T, vocab)))
                for end in ends[hits].tolist():
                    gram = tuple(batch.ids[end - n + 1:end + 1].tolist())
                    if len(wanted[gram]) < per_ngram:
                        start = max(end - int(batch.position[end]), end + 1 - n - context_tokens)
                        wanted[gram].append(self.tokenizer.decode(batch.raw[start:end + 1]
                                                                  .tolist()))
            if all(len(texts) >= per_ngram for texts in wanted.values()):
                break
        return wanted


def default_index_for(files: ModelFiles | MemoryFiles) -> NgramIndex | None:
    """The index that goes with a model: its own (``.engram/ngram-index.safetensors`` beside
    its rows), else the bundled one when the tokenizer matches; None when there is neither.

    Raises:
        MismatchError: the model's own index no longer fits it (rebuild it).
    """
    own = own_index_file(files)
    if own.is_file():
        return NgramIndex.open(own, files)
    bundled = bundled_index_file()
    if bundled.is_file():
        try:
            return NgramIndex.open(bundled, files)
        except MismatchError:
            return None
    return None
