"""safetensors files read by offset: header, tensor locations, sharded indexes and byte ranges.

Implements the format of the safetensors README without torch and
without loading tensors; decoding the bytes is left to dtypes.py, rows to memory.py.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engram_edit.errors import BadInputError

MAX_HEADER_BYTES = 100_000_000  # the safetensors limit, against absurd lengths in damaged files
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAMES = ("model.safetensors", "memory.safetensors")  # model dir, memory dir

# Bits per element of every safetensors dtype code; F4 and F6 pack several elements per byte.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes sit: ``nbytes`` bytes from absolute byte ``offset`` of ``path``."""

    path: Path
    name: str
    dtype: str  # safetensors code: F32, BF16, F16, F8_E4M3, F8_E8M0, I64, ...
    shape: tuple[int, ...]
    offset: int  # absolute offset in the file (8 + header length + data_offsets[0])
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    path: Path
    tensors: dict[str, TensorLocation]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 8  # absolute offset of the byte buffer
    file_size: int = 0


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    repeated = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    if repeated:
        raise ValueError(f"repeated key(s) {', '.join(map(repr, repeated))}")
    return dict(pairs)


def _entry_problems(name: str, entry: object) -> tuple[list[str], tuple | None]:
    """Problems of one tensor entry, and (dtype, shape, begin, end) when it has none."""
    if not isinstance(entry, dict):
        return [f"tensor {name!r}: entry is not a JSON object"], None
    p: list[str] = []
    extra = sorted(set(entry) - {"dtype", "shape", "data_offsets"})
    if extra:
        p.append(f"tensor {name!r}: unknown field(s) {', '.join(extra)}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        p.append(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or any(
        not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape
    ):
        p.append(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or any(not isinstance(o, int) or isinstance(o, bool) or o < 0 for o in offsets)
            or offsets[0] > offsets[1]):
        p.append(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                 f"got {offsets!r}")
    if p:
        return p, None
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        return [f"tensor {name!r}: {numel} elements of {dtype} do not fill whole bytes"], None
    if offsets[1] - offsets[0] != bits // 8:
        return [f"tensor {name!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes "
                f"but {dtype} {shape} needs {bits // 8}"], None
    return [], (dtype, tuple(shape), offsets[0], offsets[1])


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse the header of a safetensors file and check it against the file's size.

    Only the 8-byte length and the JSON header are read. Every tensor entry is checked (known
    dtype, shape, offsets that match the shape, a buffer with no holes or overlaps that ends
    exactly at the end of the file) and all problems are reported together.

    Args:
        path (`str` or `os.PathLike`): the ``.safetensors`` file.

    Returns:
        `SafetensorsHeader`: tensors by name (``__metadata__`` excluded) and the metadata.

    Raises:
        BadInputError: the file is missing, not a safetensors file, damaged or truncated; each
            line names the file.

    Example:
        >>> header = read_header("model.safetensors")  # doctest: +SKIP
        >>> header.tensors["layers.1.engram.embed.weight"].dtype  # doctest: +SKIP
        'F8_E4M3'
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if not path.is_file():
        raise BadInputError(f"{path}: not a file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise BadInputError(f"{path}: not a safetensors file (only {size} bytes, the "
                                f"8-byte header length is missing)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise BadInputError(f"{path}: header length {n} bytes is over the "
                                f"{MAX_HEADER_BYTES // 1_000_000} MB limit (not a safetensors "
                                f"file, or a damaged one)")
        if 8 + n > size:
            raise BadInputError(f"{path}: header length {n} bytes runs past the end of the file "
                                f"({size} bytes; truncated or not a safetensors file)")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise BadInputError(f"{path}: header does not start with '{{' (not a safetensors file)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadInputError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    problems: list[str] = []
    if not isinstance(metadata, dict) or any(
        not isinstance(v, str) for v in metadata.values()
    ):
        problems.append("__metadata__ must map strings to strings")
        metadata = {}
    data_start = 8 + n
    entries: list[tuple[int, int, str, str, tuple]] = []
    for name, entry in header.items():
        p, ok = _entry_problems(name, entry)
        problems += p
        if ok:
            dtype, shape, begin, end = ok
            entries.append((begin, end, name, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    expected = 0
    for begin, end, name, _, _ in entries:
        if begin < expected:
            problems.append(f"tensor {name!r}: data starts at {begin}, inside the previous "
                            f"tensor's data (ends at {expected})")
        elif begin > expected:
            problems.append(f"tensor {name!r}: {begin - expected} unindexed bytes before its "
                            f"data (the buffer must have no holes)")
        expected = max(expected, end)
    if problems:
        raise BadInputError([f"{path}: {p}" for p in problems])
    buffer = size - data_start
    if expected > buffer:
        past = [e[2] for e in entries if e[1] > buffer]
        raise BadInputError(
            f"{path}: file is truncated: tensor data needs {data_start + expected} bytes but the "
            f"file has {size} ({len(past)} tensor(s) cut off, first {past[0]!r})")
    if expected < buffer:
        raise BadInputError(f"{path}: {buffer - expected} bytes after the last tensor's data "
                            f"(not written by safetensors, or damaged)")
    tensors = {
        name: TensorLocation(path, name, dtype, shape, data_start + begin, end - begin)
        for begin, end, name, dtype, shape in entries
    }
    return SafetensorsHeader(path, tensors, dict(metadata), data_start, size)


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadInputError(f"{index}: not valid JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise BadInputError(f"{index}: needs a \"weight_map\" object from tensor name to shard "
                            f"file name")
    problems = [f"{index}: tensor {name!r}: shard {shard!r} is not a file name inside "
                f"{index.parent}" for name, shard in weight_map.items()
                if Path(shard).name != shard or shard in ("", ".", "..")]
    if problems:
        raise BadInputError(problems)
    return weight_map


def locate_tensors(model: str | os.PathLike) -> dict[str, TensorLocation]:
    """Find every tensor of a model or memory: one safetensors file, or a directory.

    A directory is read through ``model.safetensors.index.json`` when it has one (tensors are
    the index's ``weight_map``, each looked up in its shard), else its ``model.safetensors``,
    else its ``memory.safetensors``.

    Args:
        model (`str` or `os.PathLike`): a ``.safetensors`` file or a model / memory directory.

    Returns:
        `dict[str, TensorLocation]`: every tensor by name.

    Raises:
        BadInputError: no weights found, a damaged file, or an index naming a tensor its shard
            lacks.

    Example:
        >>> locs = locate_tensors("my-model/")  # doctest: +SKIP
        >>> locs["layers.1.engram.embed.weight"].path.name  # doctest: +SKIP
        'model-00002-of-00004.safetensors'
    """
    model = Path(model)
    if model.is_file():
        return read_header(model).tensors
    if not model.is_dir():
        raise BadInputError(f"{model}: no such file or directory")
    index = model / INDEX_NAME
    if not index.is_file():
        for name in SINGLE_FILE_NAMES:
            if (model / name).is_file():
                return read_header(model / name).tensors
        raise BadInputError(f"{model}: no {INDEX_NAME}, {' or '.join(SINGLE_FILE_NAMES)} in "
                            f"this directory")
    weight_map = _read_index(index)
    headers: dict[str, SafetensorsHeader] = {}
    problems: list[str] = []
    for shard in sorted(set(weight_map.values())):
        try:
            headers[shard] = read_header(model / shard)
        except BadInputError as e:
            problems += e.problems
    found: dict[str, TensorLocation] = {}
    for name, shard in weight_map.items():
        if shard not in headers:
            continue
        loc = headers[shard].tensors.get(name)
        if loc is None:
            problems.append(f"{index}: tensor {name!r} is mapped to {shard} but that file has "
                            f"no such tensor")
        else:
            found[name] = loc
    if problems:
        raise BadInputError(problems)
    return found


def pread_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    """Fill ``buf`` (a writable byte view) from absolute ``offset`` of the open file ``fd``.

    Raises:
        BadInputError: the file ends before ``buf`` is full (it shrank after it was opened).
    """
    done = 0
    while done < len(buf):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [buf[done:]], offset + done)
        else:
            chunk = os.pread(fd, len(buf) - done, offset + done)
            got = len(chunk)
            buf[done:done + got] = chunk
        if got == 0:
            raise BadInputError(f"{path}: file ends at byte {offset + done}, expected data up to "
                                f"byte {offset + len(buf)} (truncated while open?)")
        done += got


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at absolute ``offset`` of the open file ``fd``."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def read_range(loc: TensorLocation, start: int, nbytes: int) -> bytes:
    """Read ``nbytes`` bytes from byte ``start`` of one tensor's data (not the whole file).

    Args:
        loc (`TensorLocation`): the tensor.
        start (`int`): offset within the tensor's data, in bytes.
        nbytes (`int`): how many bytes to read.

    Returns:
        `bytes`: exactly ``nbytes`` bytes.

    Raises:
        BadInputError: the range is outside the tensor, or the file is shorter than its header
            says.

    Example:
        >>> row = read_range(locs["layers.1.engram.embed.weight"], 7 * 256, 256)  # doctest: +SKIP
    """
    if start < 0 or nbytes < 0 or start + nbytes > loc.nbytes:
        raise BadInputError(f"{loc.path}: bytes {start}..{start + nbytes} are outside tensor "
                            f"{loc.name!r} ({loc.nbytes} bytes)")
    out = bytearray(nbytes)
    fd = os.open(loc.path, os.O_RDONLY)
    try:
        pread_into(fd, memoryview(out), loc.offset + start, loc.path)
    finally:
        os.close(fd)
    return bytes(out)
