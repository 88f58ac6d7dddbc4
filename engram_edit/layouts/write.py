"""The output files of import and export: where each tensor's bytes come from, and a writer
that keeps a source file's header byte for byte.

Byte sources are tensorwrite.py's (a TensorLocation to copy, or a producer of chunks); this
module adds the ones the layouts' rules need and never holds more than a chunk. Used by
interop.py.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engram_edit import dtypes
from engram_edit.layouts.base import header_entries
from engram_edit.memory import MemoryTable
from engram_edit.split import CONVERT_VALUES
from engram_edit.tensorfile import TensorLocation, pread_into, pwrite_all
from engram_edit.tensorwrite import (
    CHUNK_BYTES,
    CopyProgress,
    Meter,
    Producer,
    ProgressFn,
    Source,
    TensorEntry,
    write_safetensors,
)


def concat(parts: list[TensorLocation]) -> Producer:
    """The bytes of ``parts`` one after the other, read in chunks (a Stack rule, imported)."""
    def produce() -> Iterator[bytes]:
        buf = bytearray(max(1, min(CHUNK_BYTES, max(p.nbytes for p in parts))))
        for part in parts:
            fd = os.open(part.path, os.O_RDONLY)
            try:
                for start in range(0, part.nbytes, len(buf)):
                    n = min(len(buf), part.nbytes - start)
                    pread_into(fd, memoryview(buf)[:n], part.offset + start, part.path)
                    yield bytes(buf[:n])
            finally:
                os.close(fd)
    return produce


def piece(loc: TensorLocation, index: int, count: int, shape: tuple[int, ...]) -> TensorLocation:
    """Part ``index`` of ``count`` equal parts of a tensor's bytes (a Stack rule, exported)."""
    size = loc.nbytes // count
    return TensorLocation(loc.path, loc.name, loc.dtype, shape, loc.offset + index * size, size)


def constant(data: bytes) -> Producer:
    """Bytes known in advance (a Derived rule, exported)."""
    return lambda: iter([data])


def fp8_rows(table: MemoryTable, layer: int, part: str) -> Producer:
    """A layer's rows re-encoded to FP8 per docs/engram.md section 7 (``part``: data or
    scale), a chunk of rows at a time."""
    def produce() -> Iterator[bytes]:
        rows, width = table.num_rows(layer), table.width(layer)
        step = max(1, CONVERT_VALUES // width)
        for first in range(0, rows, step):
            ids = np.arange(first, min(rows, first + step), dtype=np.int64)
            data, scale = dtypes.encode("float8_e4m3", table.read_raw(layer, ids).values())
            yield (data if part == "data" else scale).tobytes()
    return produce


def _write_with_header(path: Path, header: bytes, sources: dict[str, Source],
                       meter: Meter) -> int:
    """A safetensors file whose header is ``header`` byte for byte; each tensor's data goes to
    the offsets that header gives it."""
    entries = header_entries(header)
    assert set(entries) == set(sources), f"{path}: tensors differ from the header's"
    buf = memoryview(bytearray(CHUNK_BYTES))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        pwrite_all(fd, header, 0)
        for name, (_, _, begin, end) in sorted(entries.items(), key=lambda e: e[1][2]):
            at, source = len(header) + begin, sources[name]
            if isinstance(source, TensorLocation):
                assert source.nbytes == end - begin, f"{name}: {source.nbytes} != {end - begin}"
                src = os.open(source.path, os.O_RDONLY)
                try:
                    for start in range(0, source.nbytes, len(buf)):
                        n = min(len(buf), source.nbytes - start)
                        pread_into(src, buf[:n], source.offset + start, source.path)
                        pwrite_all(fd, buf[:n], at + start)
                        meter.tick(name, n)
                finally:
                    os.close(src)
                continue
            done = 0
            for chunk in source():
                pwrite_all(fd, chunk, at + done)
                done += len(chunk)
                meter.tick(name, len(chunk))
            assert done == end - begin, f"{name}: produced {done} bytes, header says {end - begin}"
    finally:
        os.close(fd)
    size = os.stat(path).st_size
    assert size == len(header) + max((e[3] for e in entries.values()), default=0), path
    return size


@dataclass
class OutFile:
    """One safetensors file to write: its tensors and where their bytes come from."""

    name: str
    tensors: list[tuple[TensorEntry, Source]]
    metadata: dict[str, str]
    header: bytes | None = None  # the source file's header, when every entry still matches it


def write_files(out: Path, files: list[OutFile], progress: ProgressFn | None) -> int:
    """Write every file into directory ``out`` (verbatim header, else split.py's layout);
    returns their total size."""
    meter = Meter(sum(e.nbytes for f in files for e, _ in f.tensors), progress)
    size = 0
    for f in files:
        if f.header is not None:
            size += _write_with_header(out / f.name, f.header, {e.name: s for e, s in f.tensors},
                                       meter)
        else:
            base = meter.done
            size += write_safetensors(out / f.name, f.tensors, f.metadata, None if progress is None
                                      else lambda p, b=base: progress(
                                          CopyProgress(b + p.done, meter.total, p.tensor)))
            meter.done = base + sum(e.nbytes for e, _ in f.tensors)
    return size


def matches(header: bytes, tensors: list[tuple[TensorEntry, Source]]) -> bool:
    """Whether ``tensors`` are exactly the header's entries (names, dtypes, shapes)."""
    entries = header_entries(header)
    return len(entries) == len(tensors) and all(
        e.name in entries and entries[e.name][:2] == (e.dtype, tuple(e.shape)) for e, _ in tensors)


def header_bytes(text: str) -> bytes:
    """A header as raw_header returns it, from its JSON text (as import.json keeps it)."""
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


