"""Atomic file writes: a temp file beside the target, fsync, rename, fsync of the directory.

Every model, memory or patch file goes through here; in-place row writes do not (they go under
the write-ahead journal instead).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engram_edit.errors import BadInputError


def read_json(file: Path) -> Any:
    """A JSON file's value.

    Raises:
        BadInputError: one line naming the file: not found, unreadable, not UTF-8 or not JSON.
    """
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{file}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(f"{file}: cannot read ({err})") from None


def _default_mode() -> int:
    """0o666 less the umask: what a plain ``open(..., "w")`` would give (mkstemp gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (which makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path in the target's directory; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _default_mode())
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, target)
        fsync_path(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside ``target``; on success it becomes ``target``.

    With ``replace`` an existing ``target`` is swapped out and removed only after the new
    directory is in place; without it an existing ``target`` is an error for the caller to
    have checked first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(tmp, _default_mode() | 0o111)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, _default_mode())  # some writers create files 0o600
                fsync_path(f)
        old = None
        if target.exists():
            if not replace:
                raise FileExistsError(target)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
