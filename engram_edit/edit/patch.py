"""Patch: the one value every edit method produces, and its file format (*.patch.safetensors).

A patch lists, per Engram layer, the touched row ids with their stored bytes before and after,
plus metadata. Applying and undoing are journal.py's; how the rows were computed is not
recorded here beyond ``metadata["method"]``.

File format (safetensors, readable without torch):
  tensors, for each layer L with edits:
    ``layers.L.rows``          I64 [n]           row ids, strictly increasing
    ``layers.L.before``        storage [n, w]    rows as stored before (F32, U16 = bf16 bits,
                                                 F16, U8 = E4M3 bytes)
    ``layers.L.after``         storage [n, w]    rows as stored after
    ``layers.L.before_scale``  U8 [n, w/32]      E8M0 scale bytes, FP8 rows only
    ``layers.L.after_scale``   U8 [n, w/32]      likewise
  __metadata__ (strings only):
    ``format`` = "engram-patch", ``format_version`` = "1",
    ``fingerprint`` = the memory fingerprint the patch was made against,
    ``row_dtypes`` = JSON {layer id: row dtype name},
    ``metadata`` = JSON object (facts, method, settings, metrics, tool version, created).
Edge cases: an empty patch (no layer) is valid and applies as a no-op; unknown metadata keys
are kept and ignored; a row id appears at most once per layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from engram_edit.errors import BadInputError
from engram_edit.fileio import atomic_path
from engram_edit.memory import RawRows

PATCH_FORMAT = "engram-patch"
PATCH_FORMAT_VERSION = "1"
PATCH_SUFFIX = ".patch.safetensors"


def tool_version() -> str:
    """The installed engram-edit's version, as patch metadata records it ("unknown" when the
    package is not installed)."""
    try:
        return importlib_metadata.version("engram-edit")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class LayerEdit:
    layer_id: int
    rows: np.ndarray  # int64 [n], strictly increasing
    before: RawRows
    after: RawRows

    def __post_init__(self) -> None:
        assert self.rows.ndim == 1 and len(self.rows) == len(self.before) == len(self.after)
        assert (np.diff(self.rows) > 0).all(), "row ids must be strictly increasing"

    @property
    def changed(self) -> np.ndarray:
        """bool [n]: rows whose stored bytes differ between before and after."""
        return ~self.before.row_equal(self.after)


@dataclass
class Patch:
    fingerprint: str
    edits: list[LayerEdit]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_touched(self) -> int:
        return sum(len(e.rows) for e in self.edits)

    def inverse(self) -> Patch:
        """The patch that undoes this one (before and after swapped)."""
        return Patch(self.fingerprint,
                     [LayerEdit(e.layer_id, e.rows, e.after, e.before) for e in self.edits],
                     dict(self.metadata))


def _tensors(patch: Patch) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for e in patch.edits:
        p = f"layers.{e.layer_id}."
        out[p + "rows"] = np.ascontiguousarray(e.rows, dtype=np.int64)
        for side, raw in (("before", e.before), ("after", e.after)):
            out[p + side] = np.ascontiguousarray(raw.data)
            if raw.scale is not None:
                out[p + side + "_scale"] = np.ascontiguousarray(raw.scale, dtype=np.uint8)
    return out


def write_patch(patch: Patch, path: str | Path) -> Path:
    """Write ``patch`` to ``path`` atomically."""
    from safetensors.numpy import save_file

    path = Path(path)
    meta = {
        "format": PATCH_FORMAT,
        "format_version": PATCH_FORMAT_VERSION,
        "fingerprint": patch.fingerprint,
        "row_dtypes": json.dumps({str(e.layer_id): e.before.dtype for e in patch.edits}),
        "metadata": json.dumps(patch.metadata, sort_keys=True, ensure_ascii=False),
    }
    with atomic_path(path) as tmp:
        save_file(_tensors(patch), str(tmp), metadata=meta)
    return path


def read_patch(path: str | Path) -> Patch:
    """Read and fully check a patch file; every problem is reported, naming the file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from engram_edit.tensorfile import read_header

    path = Path(path)
    header = read_header(path)  # missing / truncated files fail here with a clear line
    meta = header.metadata
    problems = []
    if meta.get("format") != PATCH_FORMAT:
        raise BadInputError(f"{path}: not an engram-edit patch (format is "
                            f"{meta.get('format')!r}, expected {PATCH_FORMAT!r})")
    if meta.get("format_version") != PATCH_FORMAT_VERSION:
        problems.append(f"{path}: format_version {meta.get('format_version')!r} is not "
                        f"supported (expected {PATCH_FORMAT_VERSION})")
    try:
        metadata = json.loads(meta.get("metadata", "{}"))
        row_dtypes = json.loads(meta.get("row_dtypes", "{}"))
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path}: metadata is not valid JSON ({err.msg})") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise BadInputError(f"{path}: cannot read tensors ({err})") from None
    layer_ids = sorted({int(k.split(".")[1]) for k in tensors if k.endswith(".rows")})
    edits = []
    for lid in layer_ids:
        p = f"layers.{lid}."
        missing = [p + s for s in ("before", "after") if p + s not in tensors]
        if missing:
            problems.extend(f"{path}: missing tensor {m}" for m in missing)
            continue
        rows = tensors[p + "rows"]
        before = RawRows(tensors[p + "before"], tensors.get(p + "before_scale"))
        after = RawRows(tensors[p + "after"], tensors.get(p + "after_scale"))
        if rows.dtype != np.int64 or rows.ndim != 1 or (np.diff(rows) <= 0).any():
            problems.append(f"{path}: {p}rows must be int64 and strictly increasing")
            continue
        if not (len(rows) == len(before) == len(after)) or before.data.shape != after.data.shape:
            problems.append(f"{path}: layer {lid}: rows, before and after differ in length")
            continue
        if row_dtypes.get(str(lid)) not in (None, before.dtype):
            problems.append(f"{path}: layer {lid}: stored as {before.dtype}, metadata says "
                            f"{row_dtypes.get(str(lid))}")
            continue
        edits.append(LayerEdit(lid, rows, before, after))
    if problems:
        raise BadInputError(problems)
    return Patch(meta.get("fingerprint", ""), edits, metadata)
