"""Write safetensors files by streaming tensor bytes in bounded chunks, atomically (each file is
created new, inside the caller's fileio.atomic_dir). The reading side is tensorfile.py."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engram_edit.errors import BadInputError
from engram_edit.tensorfile import DTYPE_BITS, TensorLocation, pread_into, pwrite_all

CHUNK_BYTES = 4 << 20  # bytes per read and write when copying; 64 MB ran ~3x slower (cache)
DEFAULT_METADATA = {"format": "pt"}  # what safetensors.torch writes; transformers expects it


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file to be written: its header entry; the bytes come separately."""

    name: str
    dtype: str  # safetensors code (tensorfile.DTYPE_BITS)
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        bits = DTYPE_BITS[self.dtype]
        for d in self.shape:
            bits *= d
        assert bits % 8 == 0, f"{self.name}: {self.dtype} {self.shape} is not whole bytes"
        return bits // 8


Producer = Callable[[], Iterable[bytes | memoryview]]  # yields a tensor's bytes, front to back
Source = TensorLocation | Producer


@dataclass(frozen=True)
class CopyProgress:
    """Where a long write stands; passed to the ``progress`` callback after every chunk."""

    done: int  # bytes of tensor data written so far, every output file together
    total: int  # bytes of tensor data to write in all
    tensor: str  # the tensor being written


ProgressFn = Callable[[CopyProgress], None]


class Meter:
    """Counts the bytes written and reports each step to ``progress``."""

    def __init__(self, total: int, progress: ProgressFn | None) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def tick(self, tensor: str, nbytes: int) -> None:
        """Add ``nbytes`` written to ``tensor`` and call ``progress``."""
        self.done += nbytes
        if self.progress is not None:
            self.progress(CopyProgress(self.done, self.total, tensor))


def safetensors_header(entries: list[TensorEntry], metadata: dict[str, str]
                       ) -> tuple[bytes, dict[str, int]]:
    """The header of a safetensors file (length prefix included) and each tensor's offset.

    The byte buffer holds the tensors largest element first, then by name (safetensors' own
    order: every tensor starts aligned to its element size); the JSON lists ``__metadata__``
    (omitted when empty) and then the tensors by name, and is padded with spaces to a multiple
    of 8 bytes.

    Args:
        entries (`list[TensorEntry]`): every tensor of the file, names unique.
        metadata (`dict[str, str]`): the ``__metadata__`` strings.

    Returns:
        `tuple[bytes, dict[str, int]]`: the bytes before the buffer, and each tensor's offset
        in the buffer.

    Raises:
        BadInputError: repeated names, an unknown dtype, or metadata that is not strings.

    Example:
        >>> head, offsets = safetensors_header([TensorEntry("a", "U8", (3,))], {})
        >>> head[8:].rstrip(b" "), offsets
        (b'{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}', {'a': 0})
    """
    problems = [f"tensor {e.name!r}: unknown dtype {e.dtype!r}" for e in entries
                if e.dtype not in DTYPE_BITS]
    names = [e.name for e in entries]
    problems += [f"tensor {n!r} is listed twice" for n in sorted(set(names))
                 if names.count(n) > 1]
    problems += [f"__metadata__ {k!r}: keys and values must be strings"
                 for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if problems:
        raise BadInputError(problems)
    offsets, pos = {}, 0
    for e in sorted(entries, key=lambda e: (-DTYPE_BITS[e.dtype], e.name)):
        offsets[e.name] = pos
        pos += e.nbytes
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    for e in sorted(entries, key=lambda e: e.name):
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape),
                          "data_offsets": [offsets[e.name], offsets[e.name] + e.nbytes]}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class SafetensorsWriter:
    """Writes one new safetensors file whose header is fixed before any tensor byte is known.

    The header is written first; each tensor's bytes are then written at their place, in pieces
    and in any order (``write``), or copied from another file (``copy``). ``close`` checks that
    every tensor got exactly its number of bytes.

    Example:
        >>> w = SafetensorsWriter(path, [TensorEntry("a", "U8", (3,))], {})  # doctest: +SKIP
        >>> w.write("a", 0, b"xyz"); w.close()  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, entries: list[TensorEntry],
                 metadata: dict[str, str]) -> None:
        head, offsets = safetensors_header(entries, metadata)
        self.path = Path(path)
        self.entries = {e.name: e for e in entries}
        self._start = {name: len(head) + off for name, off in offsets.items()}
        self._written = dict.fromkeys(self.entries, 0)
        self._size = len(head) + sum(e.nbytes for e in entries)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        pwrite_all(self._fd, head, 0)

    def data_order(self) -> list[str]:
        """Tensor names in the order their bytes sit in the file."""
        return sorted(self._start, key=self._start.__getitem__)

    def write(self, name: str, start: int, data: bytes | memoryview | np.ndarray) -> int:
        """Write ``data`` at byte ``start`` of tensor ``name``'s data; returns its length."""
        assert self._fd is not None, f"{self.path}: writer is closed"
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        view = memoryview(data).cast("B")
        entry = self.entries[name]
        assert 0 <= start and start + len(view) <= entry.nbytes, (
            f"{name}: bytes {start}..{start + len(view)} are outside its {entry.nbytes}")
        pwrite_all(self._fd, view, self._start[name] + start)
        self._written[name] += len(view)
        return len(view)

    def copy(self, name: str, source: TensorLocation, fd: int, buffer: memoryview,
             meter: Meter) -> None:
        """Copy tensor ``name``'s bytes from ``source`` (open as ``fd``) through ``buffer``."""
        entry = self.entries[name]
        assert (source.dtype, tuple(source.shape)) == (entry.dtype, entry.shape), (
            f"{name}: source is {source.dtype} {source.shape}, entry {entry.dtype} {entry.shape}")
        done = 0
        while done < source.nbytes:
            n = min(len(buffer), source.nbytes - done)
            copied = self._copy_in_kernel(name, fd, source.offset + done, done, n)
            if copied == 0:  # no in-kernel copy here: go through the buffer
                pread_into(fd, buffer[:n], source.offset + done, source.path)
                copied = self.write(name, done, buffer[:n])
            done += copied
            meter.tick(name, copied)

    def _copy_in_kernel(self, name: str, fd: int, src: int, start: int, n: int) -> int:
        """Copy up to ``n`` bytes with copy_file_range (no trip through user space); returns
        how many were copied, 0 where the platform or filesystem cannot."""
        if not hasattr(os, "copy_file_range"):
            return 0
        assert self._fd is not None, f"{self.path}: writer is closed"
        try:
            copied = os.copy_file_range(fd, self._fd, n, src, self._start[name] + start)
        except OSError:
            return 0
        self._written[name] += copied
        return copied

    def close(self) -> None:
        """Check that every tensor is complete, then close the file."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)
        short = [f"{self.path}: tensor {n!r} got {w} of its {self.entries[n].nbytes} bytes"
                 for n, w in sorted(self._written.items()) if w != self.entries[n].nbytes]
        assert not short, "\n".join(short)
        assert os.stat(self.path).st_size == self._size, f"{self.path}: wrong file size"

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        elif self._fd is not None:
            os.close(self._fd)
            self._fd = None


class OpenFiles:
    """Read-only descriptors of source files, each opened once."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        """The descriptor of ``path``, opened on first use."""
        if path not in self.fds:
            try:
                self.fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise BadInputError(f"{path}: cannot open ({e.strerror})") from None
        return self.fds[path]

    def __enter__(self) -> OpenFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def write_safetensors(path: str | Path, tensors: list[tuple[TensorEntry, Source]],
                      metadata: dict[str, str], progress: ProgressFn | None = None) -> int:
    """Write a new safetensors file tensor by tensor, never holding more than a chunk.

    Args:
        path (`str` or `Path`): the file to create (it must not exist).
        tensors (`list[tuple[TensorEntry, Source]]`): each tensor's entry and where its bytes
            come from: a ``TensorLocation`` in another file (copied in chunks of at most
            ``CHUNK_BYTES`` with pread and pwrite), or a producer that yields them in order.
        metadata (`dict[str, str]`): the ``__metadata__``.
        progress (callable, optional): called with a ``CopyProgress`` after every chunk.

    Returns:
        `int`: the size of the file written, in bytes.

    Raises:
        BadInputError: a source file cannot be read or is shorter than its header says.

    Example:
        >>> loc = read_header("model.safetensors").tensors["embed.weight"]  # doctest: +SKIP
        >>> entry = TensorEntry(loc.name, loc.dtype, loc.shape)  # doctest: +SKIP
        >>> write_safetensors("out.safetensors", [(entry, loc)], {})  # doctest: +SKIP
    """
    meter = Meter(sum(e.nbytes for e, _ in tensors), progress)
    largest = max((e.nbytes for e, s in tensors if isinstance(s, TensorLocation)), default=0)
    buffer = memoryview(bytearray(min(CHUNK_BYTES, max(largest, 1))))
    with OpenFiles() as files, SafetensorsWriter(path, [e for e, _ in tensors],
                                                 metadata) as writer:
        sources = {e.name: (e, s) for e, s in tensors}
        for entry, source in (sources[name] for name in writer.data_order()):
            if isinstance(source, TensorLocation):
                writer.copy(entry.name, source, files.fd(source.path), buffer, meter)
                continue
            done = 0
            for chunk in source():
                n = writer.write(entry.name, done, chunk)
                done += n
                meter.tick(entry.name, n)
    return os.stat(path).st_size
