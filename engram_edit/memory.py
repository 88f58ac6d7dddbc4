"""MemoryTable: the rows of every Engram layer, read and written row by row without a model.

Rows live in safetensors files (pread, in-place pwrite, never loaded whole) or numpy arrays;
headers are tensorfile.py's, codecs dtypes.py's (docs/engram.md section 7).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engram_edit import dtypes
from engram_edit.dtypes import SCALE_BLOCK, SCALE_CODE, RowDtype
from engram_edit.errors import BadInputError
from engram_edit.tensorfile import TensorLocation, pread_into, pwrite_all

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 64 << 20  # stored bytes per read when a whole layer is decoded


def scale_tensor_name(weight_name: str) -> str:
    """Name of the E8M0 scale tensor of an FP8 row tensor: ``.weight`` becomes ``.scale``."""
    if not weight_name.endswith(".weight"):
        raise BadInputError(f"tensor {weight_name!r}: an FP8 row tensor's name must end in "
                            f"'.weight' to find its '.scale' tensor")
    return weight_name[: -len(".weight")] + ".scale"


@dataclass(eq=False)
class RawRows:
    """Rows exactly as stored: what a patch file holds for before and after.

    ``data`` is ``[n, width]`` in the row dtype's numpy storage type (float32, uint16 bits of
    bfloat16, float16, uint8 bytes of E4M3); ``scale`` is ``[n, width / 32]`` uint8 E8M0 bytes
    for float8_e4m3 rows and None otherwise.
    """

    data: np.ndarray
    scale: np.ndarray | None = None

    @property
    def dtype(self) -> str:
        """The row dtype name these arrays are the storage of."""
        return dtypes.row_dtype_from_storage(self.data.dtype, self.scale is not None).name

    def __len__(self) -> int:
        return len(self.data)

    def values(self) -> np.ndarray:
        """The rows decoded to float32, ``[n, width]``."""
        return dtypes.decode(self.dtype, self.data, self.scale)

    def row_equal(self, other: RawRows) -> np.ndarray:
        """Per row, whether its stored bytes (and scale bytes) equal ``other``'s: bool ``[n]``."""
        if self.data.dtype != other.data.dtype or self.data.shape != other.data.shape or (
                (self.scale is None) != (other.scale is None)):
            return np.zeros(len(self), dtype=bool)
        same = (_row_bytes(self.data) == _row_bytes(other.data)).all(axis=1)
        if self.scale is not None:
            if self.scale.shape != other.scale.shape:
                return np.zeros(len(self), dtype=bool)
            same &= (_row_bytes(self.scale) == _row_bytes(other.scale)).all(axis=1)
        return same

    def equals(self, other: RawRows) -> bool:
        """Whether every stored byte equals ``other``'s (NaNs compare by their bits)."""
        return len(self) == len(other) and bool(self.row_equal(other).all())


def _row_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8).reshape(len(a), -1)


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(position in ``rows``, first row, count) of each run of consecutive sorted row ids."""
    if len(rows) == 0:
        return
    starts = np.flatnonzero(np.diff(rows) != 1) + 1
    bounds = np.concatenate([[0], starts, [len(rows)]])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        yield int(a), int(rows[a]), int(b - a)


class _Layer:
    """One layer's rows: dtype, geometry and the two stored arrays (data, optional scale)."""

    def __init__(self, dtype: RowDtype, num_rows: int, width: int) -> None:
        self.dtype, self.num_rows, self.width = dtype, num_rows, width
        self.scale_width = width // SCALE_BLOCK if dtype.scaled else 0

    def read(self, rows: np.ndarray) -> RawRows:
        """Stored bytes of sorted, unique, in-range ``rows``."""
        raise NotImplementedError

    def write(self, rows: np.ndarray, raw: RawRows) -> None:
        """Store ``raw`` at sorted, unique, in-range ``rows``."""
        raise NotImplementedError


class _ArrayLayer(_Layer):
    def __init__(self, dtype: RowDtype, data: np.ndarray, scale: np.ndarray | None) -> None:
        super().__init__(dtype, data.shape[0], data.shape[1])
        self.data, self.scale = data, scale

    def read(self, rows: np.ndarray) -> RawRows:
        return RawRows(self.data[rows], None if self.scale is None else self.scale[rows])

    def write(self, rows: np.ndarray, raw: RawRows) -> None:
        self.data[rows] = raw.data
        if self.scale is not None:
            self.scale[rows] = raw.scale


class _FileLayer(_Layer):
    def __init__(self, dtype: RowDtype, data: TensorLocation, scale: TensorLocation | None,
                 fds: dict[Path, int]) -> None:
        super().__init__(dtype, data.shape[0], data.shape[1])
        self.locs = [data] if scale is None else [data, scale]
        self.fds = fds

    def _fd(self, path: Path) -> int:
        if path not in self.fds:
            raise BadInputError(f"{path}: the memory table is closed")
        return self.fds[path]

    def _pairs(self, raw: RawRows) -> list[tuple[TensorLocation, np.ndarray]]:
        """(tensor, rows of that tensor): the data, then the scales when there are any."""
        return list(zip(self.locs, [raw.data, raw.scale][: len(self.locs)], strict=True))

    def read(self, rows: np.ndarray) -> RawRows:
        raw = RawRows(np.empty((len(rows), self.width), self.dtype.storage),
                      np.empty((len(rows), self.scale_width), np.uint8)
                      if self.dtype.scaled else None)
        for loc, out in self._pairs(raw):
            row_bytes = out.itemsize * out.shape[1]
            buf = memoryview(out.reshape(-1).view(np.uint8))  # a view: out is C-contiguous
            for pos, first, count in _runs(rows):
                pread_into(self._fd(loc.path), buf[pos * row_bytes:(pos + count) * row_bytes],
                           loc.offset + first * row_bytes, loc.path)
        return raw

    def write(self, rows: np.ndarray, raw: RawRows) -> None:
        for loc, src in self._pairs(raw):
            src = np.ascontiguousarray(src)
            row_bytes = src.itemsize * src.shape[1]
            buf = memoryview(src.reshape(-1).view(np.uint8))
            for pos, first, count in _runs(rows):
                pwrite_all(self._fd(loc.path), buf[pos * row_bytes:(pos + count) * row_bytes],
                           loc.offset + first * row_bytes)


def _close_all(fds: dict[Path, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


class MemoryTable:
    """The rows of every Engram layer, addressed by layer id and row id.

    Build one with ``MemoryTable.open`` (rows in safetensors files, read and written by offset)
    or ``MemoryTable.from_arrays`` (rows in memory). Reading never loads a whole file; writing
    happens only through ``write_raw``, in place.
    """

    def __init__(self, layers: dict[int, _Layer], fds: dict[Path, int], writable: bool) -> None:
        self._layers = layers
        self._fds = fds
        self.writable = writable
        self._finalizer = weakref.finalize(self, _close_all, fds)

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def open(cls, tensors: dict[str, TensorLocation], layers: dict[int, str],
             writable: bool = False) -> MemoryTable:
        """Open the row tensors of the given layers where they lie on disk.

        An F8_E4M3 row tensor ``NAME.weight`` takes its scales from ``NAME.scale`` (F8_E8M0,
        ``[rows, width / 32]``). Every layer is checked before any file is opened.

        Args:
            tensors (`dict[str, TensorLocation]`): from ``tensorfile.locate_tensors``.
            layers (`dict[int, str]`): layer id to its row tensor name, e.g.
                ``{1: "layers.1.engram.embed.weight"}``.
            writable (`bool`, defaults to False): open the files for ``write_raw``.

        Returns:
            `MemoryTable`: holds one open file descriptor per file; ``close()`` releases them.

        Raises:
            BadInputError: a missing tensor, a dtype that is not a row dtype, wrong shapes or
                scales, or a file shorter than its header says; all problems at once.

        Example:
            >>> locs = locate_tensors("my-model/")  # doctest: +SKIP
            >>> layers = {1: "layers.1.engram.embed.weight"}
            >>> table = MemoryTable.open(locs, layers)  # doctest: +SKIP
            >>> table.read_rows(1, np.array([7, 42])).shape  # doctest: +SKIP
            (2, 256)
        """
        problems: list[str] = []
        found: dict[int, tuple[RowDtype, TensorLocation, TensorLocation | None]] = {}
        for layer, name in sorted(layers.items()):
            p, ok = _layer_problems(tensors, layer, name)
            problems += p
            if ok:
                found[layer] = ok
        if problems:
            raise BadInputError(problems)
        fds: dict[Path, int] = {}
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            for _, data, scale in found.values():
                for loc in (data, scale):
                    if loc is None:
                        continue
                    if loc.path not in fds:
                        try:
                            fds[loc.path] = os.open(loc.path, flags)
                        except OSError as e:
                            raise BadInputError(f"{loc.path}: cannot open for "
                                                f"{'writing' if writable else 'reading'} "
                                                f"({e.strerror})") from None
                    size = os.fstat(fds[loc.path]).st_size
                    if loc.offset + loc.nbytes > size:
                        problems.append(f"{loc.path}: file is truncated: tensor {loc.name!r} "
                                        f"needs {loc.offset + loc.nbytes} bytes, the file has "
                                        f"{size}")
            if problems:
                raise BadInputError(problems)
        except BaseException:
            _close_all(fds)
            raise
        built = {layer: _FileLayer(dt, data, scale, fds)
                 for layer, (dt, data, scale) in found.items()}
        return cls(built, fds, writable)

    @classmethod
    def from_arrays(cls, arrays: dict[int, tuple[np.ndarray, np.ndarray | None]],
                    dtype: str) -> MemoryTable:
        """A writable table held in memory (copies of the given arrays).

        Args:
            arrays (`dict[int, tuple[np.ndarray, np.ndarray | None]]`): layer id to
                (storage ``[rows, width]``, uint8 E8M0 scales ``[rows, width / 32]`` or None),
                in the numpy storage type of ``dtype`` (uint16 bits for bfloat16, uint8 for
                float8_e4m3).
            dtype (`str`): the row dtype name of every layer.

        Returns:
            `MemoryTable`

        Raises:
            BadInputError: arrays of the wrong type or shape, naming the layer.

        Example:
            >>> data, scale = encode("float8_e4m3", np.ones((4, 64), np.float32))  # doctest: +SKIP
            >>> table = MemoryTable.from_arrays({0: (data, scale)}, "float8_e4m3")  # doctest: +SKIP
        """
        d = dtypes.row_dtype(dtype)
        problems: list[str] = []
        built: dict[int, _Layer] = {}
        for layer, (data, scale) in sorted(arrays.items()):
            data = np.asarray(data)
            if data.ndim != 2 or data.shape[1] == 0:
                problems.append(f"layer {layer}: rows must be a 2-D array [rows, width], got "
                                f"shape {data.shape}")
                continue
            try:
                dtypes.decode(d.name, data[:0], None if scale is None else np.asarray(scale)[:0])
            except BadInputError as e:
                problems += [f"layer {layer}: {p}" for p in e.problems]
                continue
            if scale is not None and len(scale) != len(data):
                problems.append(f"layer {layer}: {len(scale)} scale rows for {len(data)} rows")
                continue
            built[layer] = _ArrayLayer(d, np.array(data, dtype=d.storage, copy=True),
                                       None if scale is None else np.array(scale, copy=True))
        if problems:
            raise BadInputError(problems)
        return cls(built, {}, writable=True)

    def close(self) -> None:
        """Close the table's files (a no-op for in-memory tables)."""
        self._finalizer()

    def __enter__(self) -> MemoryTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- geometry ---------------------------------------------------------------------------
    @property
    def layer_ids(self) -> list[int]:
        """Layer ids with rows in this table, ascending."""
        return sorted(self._layers)

    def _layer(self, layer: int) -> _Layer:
        if layer not in self._layers:
            raise BadInputError(f"layer {layer} is not an Engram layer of this table (layers: "
                                f"{self.layer_ids})")
        return self._layers[layer]

    def num_rows(self, layer: int) -> int:
        return self._layer(layer).num_rows

    def width(self, layer: int) -> int:
        return self._layer(layer).width

    def dtype(self, layer: int) -> str:
        """The row dtype name of ``layer`` (``dtypes.ROW_DTYPES``)."""
        return self._layer(layer).dtype.name

    def _rows(self, layer: int, rows: np.ndarray) -> np.ndarray:
        n = self._layer(layer).num_rows
        r = np.asarray(rows)
        if r.size == 0:
            return np.zeros(0, dtype=np.int64)
        if r.ndim != 1 or not np.issubdtype(r.dtype, np.integer):
            raise BadInputError(f"layer {layer}: row ids must be a 1-D integer array, got "
                                f"{r.dtype} of shape {r.shape}")
        bad = np.unique(r[(r < 0) | (r >= n)])
        if bad.size:
            raise BadInputError([f"layer {layer}: row {b} is out of range (the table has {n} "
                                 f"rows)" for b in bad.tolist()])
        return r.astype(np.int64)

    # --- reading ----------------------------------------------------------------------------
    def read_raw(self, layer: int, rows: np.ndarray) -> RawRows:
        """Stored rows, exactly as on disk (repeated ids are fine).

        Args:
            layer (`int`): layer id.
            rows (`np.ndarray`): 1-D integer row ids.

        Returns:
            `RawRows`: ``data`` ``[n, width]`` in the storage type, ``scale`` ``[n, width / 32]``
            uint8 or None, in the order of ``rows``.

        Raises:
            BadInputError: unknown layer, or a row id out of range.
        """
        r = self._rows(layer, rows)
        unique, inverse = np.unique(r, return_inverse=True)
        raw = self._layers[layer].read(unique)
        return RawRows(raw.data[inverse], None if raw.scale is None else raw.scale[inverse])

    def read_rows(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """Rows decoded to float32, ``[n, width]`` (FP8 rows dequantized with their scales).

        Example:
            >>> table.read_rows(1, np.array([7, 7, 42]))  # doctest: +SKIP
        """
        return self.read_raw(layer, rows).values()

    def norms(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """L2 norm of each decoded row (summed in float64), float32 ``[n]``."""
        x = self.read_rows(layer, rows)
        return np.sqrt(np.square(x, dtype=np.float64).sum(axis=1)).astype(np.float32)

    def gather_torch(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Decoded rows for a tensor of row ids of any shape, on the ids' device.

        Only the unique rows are read; they travel to the device in their stored form and are
        decoded there, bit-identical to ``read_rows``.

        Args:
            layer (`int`): layer id.
            rows (`torch.Tensor`): integer row ids, any shape, any device.

        Returns:
            `torch.Tensor`: float32, shape ``[*rows.shape, width]``, on ``rows.device``.
        """
        import torch

        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise BadInputError(f"layer {layer}: row ids must be an integer tensor, got "
                                f"{rows.dtype}")
        flat = self._rows(layer, rows.detach().reshape(-1).cpu().numpy())
        unique, inverse = np.unique(flat, return_inverse=True)
        lay = self._layers[layer]
        raw = lay.read(unique)
        data = dtypes.storage_to_torch(raw.data).to(rows.device)
        scale = None if raw.scale is None else dtypes.scale_to_torch(raw.scale).to(rows.device)
        values = dtypes.decode_torch(lay.dtype.name, data, scale)
        index = torch.from_numpy(inverse.reshape(-1)).to(rows.device)
        return values[index].reshape(*rows.shape, lay.width)

    def to_torch(self, layer: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole layer decoded, ``[rows, width]`` on the CPU, in ``dtype`` (float32 when
        None). Read in chunks of about 64 MB of stored bytes; only the result is held whole."""
        import torch

        lay = self._layer(layer)
        out = torch.empty((lay.num_rows, lay.width), dtype=dtype or torch.float32)
        step = max(1, CHUNK_BYTES // (lay.width * lay.dtype.itemsize))
        for first in range(0, lay.num_rows, step):
            last = min(lay.num_rows, first + step)
            raw = lay.read(np.arange(first, last, dtype=np.int64))
            scale = None if raw.scale is None else dtypes.scale_to_torch(raw.scale)
            out[first:last] = dtypes.decode_torch(
                lay.dtype.name, dtypes.storage_to_torch(raw.data), scale)
        return out

    # --- writing ----------------------------------------------------------------------------
    def encode(self, layer: int, values: np.ndarray) -> RawRows:
        """Quantize float rows to ``layer``'s dtype (``dtypes.encode``); writes nothing.

        Raises:
            BadInputError: wrong shape, NaN or inf, or values too large for the dtype; the
                message names the layer.
        """
        lay = self._layer(layer)
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[1] != lay.width:
            raise BadInputError(f"layer {layer}: values must be [n, {lay.width}], got shape "
                                f"{values.shape}")
        try:
            data, scale = dtypes.encode(lay.dtype.name, values)
        except BadInputError as e:
            raise BadInputError([f"layer {layer}: {p}" for p in e.problems]) from None
        return RawRows(data, scale)

    def write_raw(self, layer: int, rows: np.ndarray, raw: RawRows) -> None:
        """Write stored rows in place (pwrite at each row's offset); nothing else changes.

        Everything is checked before the first byte is written. A row id may repeat only with
        identical bytes. Call ``flush()`` to make the writes durable.

        Args:
            layer (`int`): layer id.
            rows (`np.ndarray`): 1-D integer row ids, one per row of ``raw``.
            raw (`RawRows`): rows in ``layer``'s storage type (see ``encode``).

        Raises:
            BadInputError: a read-only table, an unknown layer, a row id out of range, ``raw``
                of the wrong type or shape, or a repeated row id with different data.
        """
        lay = self._layer(layer)
        if not self.writable:
            path = next(iter(self._fds), "memory table")
            raise BadInputError(f"{path}: the memory table was opened read-only; open it with "
                                f"writable=True to write rows")
        r = self._rows(layer, rows)
        _check_raw(layer, lay, raw, len(r))
        order = np.argsort(r, kind="stable")
        ordered = RawRows(raw.data[order], None if raw.scale is None else raw.scale[order])
        sorted_rows = r[order]
        repeat = np.flatnonzero(sorted_rows[1:] == sorted_rows[:-1]) + 1
        if repeat.size:
            first = np.searchsorted(sorted_rows, sorted_rows[repeat])  # first copy of each
            a = RawRows(ordered.data[repeat], None if raw.scale is None else ordered.scale[repeat])
            b = RawRows(ordered.data[first], None if raw.scale is None else ordered.scale[first])
            clash = np.unique(sorted_rows[repeat][~a.row_equal(b)])
            if clash.size:
                raise BadInputError([f"layer {layer}: row {c} is given more than once with "
                                     f"different data" for c in clash.tolist()])
        keep = np.ones(len(r), dtype=bool)
        keep[repeat] = False
        lay.write(sorted_rows[keep], RawRows(
            ordered.data[keep], None if raw.scale is None else ordered.scale[keep]))

    def flush(self) -> None:
        """fsync every file written through this table (a no-op for in-memory tables)."""
        if self.writable:
            for fd in self._fds.values():
                os.fsync(fd)


def _check_raw(layer: int, lay: _Layer, raw: RawRows, n: int) -> None:
    if not isinstance(raw, RawRows):
        raise BadInputError(f"layer {layer}: rows to write must be RawRows, got "
                            f"{type(raw).__name__}")
    p: list[str] = []
    want = lay.dtype.storage
    if raw.data.dtype != want or raw.data.shape != (n, lay.width):
        p.append(f"layer {layer}: rows to write must be {want} of shape {(n, lay.width)} "
                 f"({lay.dtype.name}), got {raw.data.dtype} of shape {raw.data.shape}")
    if lay.dtype.scaled:
        shape = (n, lay.scale_width)
        if raw.scale is None or raw.scale.dtype != np.uint8 or raw.scale.shape != shape:
            got = "none" if raw.scale is None else f"{raw.scale.dtype} of shape {raw.scale.shape}"
            p.append(f"layer {layer}: {lay.dtype.name} rows need uint8 {SCALE_CODE} scales of "
                     f"shape {shape}, got {got}")
    elif raw.scale is not None:
        p.append(f"layer {layer}: {lay.dtype.name} rows have no scales, but scales were given")
    if p:
        raise BadInputError(p)


def _layer_problems(tensors: dict[str, TensorLocation], layer: int, name: str
                    ) -> tuple[list[str], tuple[RowDtype, TensorLocation,
                                                TensorLocation | None] | None]:
    """Problems of one layer's row tensor (and scale), or its dtype and locations."""
    loc = tensors.get(name)
    if loc is None:
        return [f"layer {layer}: no tensor {name!r}"], None
    where = f"{loc.path}: layer {layer}: tensor {name!r}"
    try:
        dt = dtypes.row_dtype(dtypes.dtype_from_safetensors(loc.dtype))
    except BadInputError as e:
        return [f"{where}: {e.problems[0]}"], None
    if len(loc.shape) != 2 or loc.shape[1] == 0:
        return [f"{where}: rows must be 2-D [rows, width], got shape {list(loc.shape)}"], None
    if not dt.scaled:
        return [], (dt, loc, None)
    rows, width = loc.shape
    if width % SCALE_BLOCK:
        return [f"{where}: {loc.dtype} rows need a width divisible by {SCALE_BLOCK}, got "
                f"{width}"], None
    try:
        sname = scale_tensor_name(name)
    except BadInputError as e:
        return [f"{loc.path}: layer {layer}: {e.problems[0]}"], None
    scale = tensors.get(sname)
    if scale is None:
        return [f"{where}: {loc.dtype} rows need the scale tensor {sname!r}, which is "
                f"missing"], None
    want = (rows, width // SCALE_BLOCK)
    if scale.dtype != SCALE_CODE or scale.shape != want:
        return [f"{scale.path}: layer {layer}: scale tensor {sname!r} must be {SCALE_CODE} "
                f"{list(want)}, got {scale.dtype} {list(scale.shape)}"], None
    return [], (dt, loc, scale)
