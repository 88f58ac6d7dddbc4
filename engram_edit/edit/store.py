"""The ``.engram/`` folder beside a model's or memory's rows: its files, each written whole.

journal.py decides when each is written (the write protocol and the recovery rule live there);
this module only knows the layout. All writes are atomic (fileio).

Layout of ``DIR/.engram/`` (DIR is ``ModelFiles.memory_dir``, where the rows live):
  ``lock``          flock'ed by the one writer, which writes its pid into it; never deleted.
  ``patches/``      ``NNNN-NAME.patch.safetensors``: a copy of every patch applied here. NNNN is
                    its sequence number, counted from 1 and never reused.
  ``history.json``  ``{"format": "engram-history", "format_version": 1, "patches": [...]}``,
                    one entry per apply, in seq order (``HistoryEntry``). Undoing marks the entry
                    with ``undone_at`` instead of removing it, so a seq names one patch forever.
  ``journal``       exists only while a write is under way or was interrupted:
                    ``{"op": "apply"|"undo", "state": "pending"|"committed", "entry": {...}}``.
                    The rows come from the patch copy the entry names (checked by sha256).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engram_edit.checkpoint import ModelFiles
from engram_edit.edit.patch import PATCH_SUFFIX, Patch, read_patch
from engram_edit.errors import BadInputError, LockHeldError
from engram_edit.fileio import atomic_write_text, fsync_path, read_json

logger = logging.getLogger(__name__)

ENGRAM_DIR = ".engram"
LOCK_FILE = "lock"
JOURNAL_FILE = "journal"
HISTORY_FILE = "history.json"
PATCHES_DIR = "patches"
HISTORY_FORMAT = "engram-history"
HISTORY_FORMAT_VERSION = 1

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_COPY = re.compile(r"(\d{4,})-([A-Za-z0-9][A-Za-z0-9._-]*)" + re.escape(PATCH_SUFFIX))


@dataclass
class HistoryEntry:
    """One applied patch, as ``history.json`` stores it."""

    seq: int
    name: str
    file: str  # the copy, relative to .engram/: "patches/0003-fix-wales.patch.safetensors"
    sha256: str  # of that file
    applied_at: str  # ISO 8601, UTC
    rows: int  # rows the patch touches
    changed: int  # rows whose stored bytes it changes
    layers: list[int]
    fingerprint: str
    undone_at: str | None = None  # set by undo; the entry stays

    @property
    def applied(self) -> bool:
        return self.undone_at is None

    @property
    def label(self) -> str:
        """``NNNN-NAME``, how messages and the CLI name the patch."""
        return f"{self.seq:04d}-{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object, source: str) -> HistoryEntry:
        """Read one entry, refusing unknown or missing keys and copies outside ``patches/``."""
        if not isinstance(d, dict):
            raise BadInputError(f"{source}: a history entry is not a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(names - set(d) - {"undone_at"})
        if unknown or missing:
            raise BadInputError(f"{source}: history entry {d.get('seq')}: "
                                + "; ".join([f"unknown key {k!r}" for k in unknown]
                                            + [f"missing key {k!r}" for k in missing]))
        entry = cls(**d)
        m = _COPY.fullmatch(entry.file.removeprefix(PATCHES_DIR + "/"))
        if not entry.file.startswith(PATCHES_DIR + "/") or not m or int(m[1]) != entry.seq:
            raise BadInputError(f"{source}: history entry {entry.seq}: file {entry.file!r} is "
                                f"not a patch copy in {PATCHES_DIR}/")
        return entry



# --- names -----------------------------------------------------------------------------------

def engram_dir(files: ModelFiles) -> Path:
    """The ``.engram/`` folder beside the rows of ``files`` (it may not exist yet)."""
    return files.memory_dir / ENGRAM_DIR


def patch_name(path: str | Path) -> str:
    """A history name from a patch file name: suffix and any ``NNNN-`` copy prefix dropped,
    characters other than letters, digits, ``.``, ``_`` and ``-`` replaced by ``-``."""
    name = Path(path).name
    for suffix in (PATCH_SUFFIX, ".safetensors"):
        name = name.removesuffix(suffix)
    name = re.sub(r"^\d{4,}-", "", name)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).lstrip("._-")[:100]
    return name or "patch"


def check_name(name: str) -> None:
    """Refuse a history name that would not make a plain file name (BadInputError)."""
    if not _NAME.fullmatch(name):
        raise BadInputError(f"patch name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
                            f"starting with a letter or digit")


def now() -> str:
    """The time for ``applied_at`` and ``undone_at``: ISO 8601, UTC, whole seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- the lock ----------------------------------------------------------------------------------

@contextlib.contextmanager
def hold_lock(folder: Path, wait: bool = False, timeout: float | None = None) -> Iterator[None]:
    """Hold the writers' lock ``folder/lock`` (folder and file made if missing) for the block.

    Args:
        folder (`Path`): a ``.engram`` folder.
        wait (`bool`, defaults to False): wait for another holder to finish instead of failing.
        timeout (`float`, *optional*): with ``wait``, give up after this many seconds.

    Raises:
        LockHeldError: another process holds the lock (naming its pid when it wrote one).

    Example:
        >>> with hold_lock(Path("model/.engram")):  # doctest: +SKIP
        ...     pass
    """
    try:
        folder.mkdir(exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise BadInputError(f"{folder / LOCK_FILE}: cannot open the lock ({err.strerror})"
                            ) from None
    try:
        _acquire(fd, folder, wait, timeout)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, folder: Path, wait: bool, timeout: float | None) -> None:
    if wait and timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + (timeout or 0.0)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not wait or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    who = f"process {holder}" if holder.isdigit() else "another process"
    waited = f" (waited {timeout:g} s)" if wait else ""
    raise LockHeldError(f"{folder.parent}: {who} is writing to these rows{waited}; let it "
                        f"finish, or rerun with --wait to wait for it")


# --- history and journal files -----------------------------------------------------------------

def read_history(folder: Path) -> list[HistoryEntry]:
    """Every entry of ``folder/history.json`` in seq order, undone ones included ([] if none)."""
    path = folder / HISTORY_FILE
    if not path.is_file():
        return []
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT or not isinstance(
            data.get("patches"), list):
        raise BadInputError(f"{path}: not an engram-edit history (format is not "
                            f"{HISTORY_FORMAT!r} with a list of patches)")
    if data.get("format_version") != HISTORY_FORMAT_VERSION:
        raise BadInputError(f"{path}: format_version {data.get('format_version')!r} is not "
                            f"supported (expected {HISTORY_FORMAT_VERSION})")
    entries = [HistoryEntry.from_dict(d, str(path)) for d in data["patches"]]
    return sorted(entries, key=lambda e: e.seq)


def write_history(folder: Path, entries: list[HistoryEntry]) -> None:
    """Replace ``folder/history.json`` atomically with ``entries`` in seq order."""
    data = {"format": HISTORY_FORMAT, "format_version": HISTORY_FORMAT_VERSION,
            "patches": [e.to_dict() for e in sorted(entries, key=lambda e: e.seq)]}
    atomic_write_text(folder / HISTORY_FILE, json.dumps(data, indent=1) + "\n")


@dataclass
class JournalRecord:
    """The contents of ``journal``: which write was under way and how far it got."""

    op: str  # "apply" or "undo"
    state: str  # "pending" (rows may be half written) or "committed" (rows all written)
    entry: HistoryEntry  # as history.json will hold it once the write is done


def read_journal(folder: Path) -> JournalRecord | None:
    """The journal record of ``folder``, or None when no write is under way or interrupted."""
    path = folder / JOURNAL_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        op, state, entry = data["op"], data["state"], data["entry"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise BadInputError(f"{path}: damaged journal ({err!r})") from None
    if op not in ("apply", "undo") or state not in ("pending", "committed"):
        raise BadInputError(f"{path}: damaged journal (op {op!r}, state {state!r})")
    return JournalRecord(op, state, HistoryEntry.from_dict(entry, str(path)))


def write_journal(folder: Path, record: JournalRecord) -> None:
    """Replace ``folder/journal`` atomically: once this returns the record is on disk."""
    data = {"op": record.op, "state": record.state, "entry": record.entry.to_dict()}
    atomic_write_text(folder / JOURNAL_FILE, json.dumps(data))


def delete_journal(folder: Path) -> None:
    """Remove the journal and make its removal durable (the last step of every write)."""
    (folder / JOURNAL_FILE).unlink(missing_ok=True)
    fsync_path(folder)


def load_copy(folder: Path, entry: HistoryEntry) -> Patch:
    """The patch copy ``entry`` names, refused when missing or not matching its sha256."""
    path = folder / entry.file
    if not path.is_file():
        raise BadInputError(f"{path}: the copy of applied patch {entry.label} is missing")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise BadInputError(f"{path}: the copy of {entry.label} is damaged (sha256 "
                            f"{digest[:12]}, history says {entry.sha256[:12]})")
    return read_patch(path)


def next_seq(folder: Path, entries: list[HistoryEntry]) -> int:
    """One past every seq in the history and among the copies."""
    seqs = [e.seq for e in entries]
    if (folder / PATCHES_DIR).is_dir():
        seqs += [int(m[1]) for p in (folder / PATCHES_DIR).iterdir()
                 if (m := _COPY.fullmatch(p.name))]
    return max(seqs, default=0) + 1


def remove_strays(folder: Path, keep: set[str]) -> None:
    """Temp files of interrupted atomic writes, and copies no history entry or journal names."""
    for d in (folder, folder / PATCHES_DIR):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            copy = d.name == PATCHES_DIR and _COPY.fullmatch(p.name)
            rel = f"{PATCHES_DIR}/{p.name}"
            if (p.name.startswith(".") and p.name.endswith(".tmp")) or (copy and rel not in keep):
                logger.info("removing %s, left by an interrupted write", p)
                p.unlink(missing_ok=True)
