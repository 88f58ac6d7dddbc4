"""Rows set directly, without a model (torch-free): one n-gram's rows per hash head, their new
values (another n-gram's rows, zeros, scaled), and ``rows_patch``, the Patch that stores float
rows in a table's dtype, which every edit method ends with.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from engram_edit.checkpoint import ModelFiles
from engram_edit.edit.patch import LayerEdit, Patch
from engram_edit.errors import BadInputError
from engram_edit.memory import MemoryTable, RawRows


class NgramOp(str, Enum):
    COPY = "copy"  # the rows of another n-gram, head by head
    ZERO = "zero"
    SCALE = "scale"


def ngram_rows(files: ModelFiles, ngram: str, layers: list[int] | None = None,
               heads: list[int] | None = None) -> dict[int, np.ndarray]:
    """The row each chosen head reads for ``ngram`` (its last position), per chosen layer.

    Raises:
        BadInputError: the text is not 2..max_ngram tokens, or an unknown layer or head.
    """
    hasher, tok = files.hasher, files.tokenizer
    ids = tok.encode(ngram)
    if not 2 <= len(ids) <= hasher.max_ngram:
        raise BadInputError(f"n-gram {ngram!r} is {len(ids)} token(s); an n-gram has 2 to "
                            f"{hasher.max_ngram} (it is encoded exactly as given: a word from "
                            f"mid-sentence may need its leading space)")
    layers = hasher.layer_ids if layers is None else layers
    heads = list(range(hasher.n_heads)) if heads is None else heads
    bad = [f"--layer {i}: not an Engram layer (layers {hasher.layer_ids})"
           for i in layers if i not in hasher.layer_ids]
    bad += [f"--heads {h}: no such head (0 to {hasher.n_heads - 1})"
            for h in heads if not 0 <= h < hasher.n_heads]
    if bad:
        raise BadInputError(bad)
    rows = hasher.rows(tok.compress(ids)[None, :])
    return {lid: np.array([rows[lid][0, -1, hasher.column(len(ids), h)] for h in heads],
                          dtype=np.int64) for lid in layers}


def ngram_values(table: MemoryTable, rows: dict[int, np.ndarray], op: NgramOp,
                 source: dict[int, np.ndarray] | None = None,
                 scale: float | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """New float32 values for ``rows`` (one per head, from ``ngram_rows``): ``source``'s rows
    (same layers and heads), zeros, or the rows times ``scale``."""
    out = {}
    for lid, r in rows.items():
        if op is NgramOp.COPY:
            assert source is not None, "copy needs the source n-gram's rows"
            values = table.read_rows(lid, source[lid])
        elif op is NgramOp.ZERO:
            values = np.zeros((len(r), table.width(lid)), dtype=np.float32)
        else:
            assert scale is not None, "scale needs a factor"
            values = table.read_rows(lid, r) * np.float32(scale)
        out[lid] = (r, values)
    return out


def rows_patch(table: MemoryTable, fingerprint: str,
               values: dict[int, tuple[np.ndarray, np.ndarray]],
               metadata: dict | None = None) -> Patch:
    """The Patch that stores ``values`` (layer -> (row ids, float32 rows)) in ``table``'s
    dtype. Rows whose stored bytes would not change are left out; a row id given twice keeps
    its last values. Reads the before-rows; writes nothing.

    Raises:
        BadInputError: values that do not fit the dtype (NaN, inf, too large), naming the layer.
    """
    edits = []
    for lid in sorted(values):
        rows, vals = values[lid]
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            continue
        order = np.argsort(rows, kind="stable")
        rows, vals = rows[order], np.asarray(vals, dtype=np.float32)[order]
        last = np.r_[rows[1:] != rows[:-1], True]
        rows, vals = rows[last], vals[last]
        before = table.read_raw(lid, rows)
        after = table.encode(lid, vals)
        changed = ~before.row_equal(after)
        if not changed.any():
            continue
        pick = np.flatnonzero(changed)
        edits.append(LayerEdit(lid, rows[pick], _take(before, pick), _take(after, pick)))
    return Patch(fingerprint, edits, dict(metadata or {}))


def _take(raw: RawRows, pick: np.ndarray) -> RawRows:
    return RawRows(raw.data[pick], None if raw.scale is None else raw.scale[pick])
