"""Applying and undoing patches in place, crash-safely: the write protocol and its recovery rule.

The patch write protocol: the checks before a write, the journalled write, recovery,
undo, history and verify. The files of ``.engram/`` (lock, patch copies, history, journal
record) are store.py's; what a patch holds is patch.py's; where a write may go is target.py's.

One write (apply; undo is the same with before and after swapped, and no new copy):
  1. copy the patch into ``.engram/patches/``; 2. write the journal, "pending";
  3. write the rows in place, fsync; 4. rewrite the journal, "committed";
  5. write ``history.json``; 6. delete the journal.
Steps 1, 2, 4 and 5 write a temp file, fsync it and rename it (fileio), so every file is whole.
Every step runs holding the lock, after all checks have passed.

Recovery rule (``recover``, run under the lock before every apply, undo and verify): a "pending"
journal is rolled back (the rows get their prior bytes from the copy again; an apply's copy is
deleted); a "committed" one is rolled forward (the target rows are written again and the history
is brought up to date). Either way only the patch's own rows are rewritten from a whole file, so
recovery is idempotent: a crash during recovery is recovered by the next open the same way.
Nothing outside the patch's rows changes in the model's files, so undo restores them bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engram_edit import paths
from engram_edit.checkpoint import ModelFiles, is_memory_tensor
from engram_edit.edit import store
from engram_edit.edit.patch import PATCH_SUFFIX, LayerEdit, Patch, read_patch, write_patch
from engram_edit.edit.store import HistoryEntry, JournalRecord, engram_dir
from engram_edit.errors import BadInputError, MismatchError, PatchConflictError
from engram_edit.memory import MemoryTable, RawRows

logger = logging.getLogger(__name__)

_ROWS_SHOWN = 10  # row ids listed per layer in a conflict message


# --- records -----------------------------------------------------------------------------------

@dataclass
class RecoveryReport:
    """What ``recover`` did with an interrupted write."""

    path: Path  # the .engram folder
    op: str  # "apply" or "undo": the write that was interrupted
    entry: HistoryEntry
    outcome: str  # "rolled back" (pending journal) or "rolled forward" (committed journal)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "op": self.op, "patch": self.entry.label,
                "outcome": self.outcome, "rows": self.entry.rows}

    def describe(self) -> str:
        return (f"recovered an interrupted {self.op} of {self.entry.label} in {self.path}: "
                f"{self.outcome}")


@dataclass
class ApplyReport:
    path: Path  # the directory whose rows were written
    entry: HistoryEntry
    copy: Path  # the patch's copy in .engram/patches/
    recovered: RecoveryReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), **self.entry.to_dict(), "copy": str(self.copy),
                "recovered": self.recovered and self.recovered.to_dict()}


@dataclass
class UndoReport:
    path: Path
    entry: HistoryEntry  # undone_at set
    recovered: RecoveryReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), **self.entry.to_dict(),
                "recovered": self.recovered and self.recovered.to_dict()}


@dataclass
class PatchCheck:
    """How one applied patch's after-rows stand in the table."""

    seq: int
    name: str
    rows: int  # rows the patch touches
    superseded: int  # of those, rows a later applied patch wrote again
    differ: int  # of the rest, rows that no longer hold the patch's after-bytes
    copy_ok: bool  # the copy in .engram/patches/ exists and matches its sha256


@dataclass
class VerifyReport:
    path: Path
    journal_clean: bool  # False when an interrupted write was found (and recovered)
    recovered: RecoveryReport | None
    patches: list[PatchCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "journal_clean": self.journal_clean,
                "recovered": self.recovered and self.recovered.to_dict(),
                "patches": [asdict(p) for p in self.patches], "problems": self.problems}


# --- helpers -----------------------------------------------------------------------------------

def _refuse_bundled(files: ModelFiles) -> None:
    if files.memory is None and files.path.resolve() == paths.bundled_model_dir().resolve():
        raise BadInputError(f"{files.path}: the bundled model is never written; write to a "
                            f"working copy (edit.target.writable_model) or another --model")


def _row_list(rows: np.ndarray) -> str:
    shown = ", ".join(str(r) for r in rows[:_ROWS_SHOWN].tolist())
    return shown + (f" and {len(rows) - _ROWS_SHOWN} more" if len(rows) > _ROWS_SHOWN else "")


# --- checks ------------------------------------------------------------------------------------

def _static_problems(files: ModelFiles, table: MemoryTable, patch: Patch, source: str
                     ) -> list[str]:
    """Fingerprint first (MismatchError), then layers, widths, dtypes and row ranges."""
    fp = files.fingerprint()
    if patch.fingerprint != fp:
        raise MismatchError(f"{source}: made for memory {patch.fingerprint[:12] or '(none)'}, "
                            f"but {files.memory_dir} holds memory {fp[:12]}; a patch applies "
                            f"only to the memory it was made from")
    p = []
    for e in patch.edits:
        where = f"{source}: layer {e.layer_id}"
        if e.layer_id not in table.layer_ids:
            p.append(f"{where}: not an Engram layer of {files.memory_dir} (layers "
                     f"{table.layer_ids})")
            continue
        dtype, width = table.dtype(e.layer_id), table.width(e.layer_id)
        if e.before.dtype != e.after.dtype or (e.before.scale is None) != (e.after.scale is None):
            p.append(f"{where}: before-rows are {e.before.dtype}, after-rows {e.after.dtype}")
        elif e.before.dtype != dtype:
            p.append(f"{where}: the patch holds {e.before.dtype} rows but the table stores "
                     f"{dtype}; convert the patch or the memory (convert-memory) so they match")
        elif e.before.data.shape[1] != width:
            p.append(f"{where}: rows are {e.before.data.shape[1]} wide, the table's {width}")
        n = table.num_rows(e.layer_id)
        out = e.rows[(e.rows < 0) | (e.rows >= n)]
        if out.size:
            p.append(f"{where}: row ids out of range (the table has {n} rows): "
                     f"{_row_list(out)}")
    return p


def _differing(table: MemoryTable, patch: Patch, side: str) -> dict[int, np.ndarray]:
    """Per layer, the row ids whose stored bytes differ from the patch's ``side`` rows."""
    out = {}
    for e in patch.edits:
        want: RawRows = e.before if side == "before" else e.after
        same = table.read_raw(e.layer_id, e.rows).row_equal(want)
        if not same.all():
            out[e.layer_id] = e.rows[~same]
    return out


def _conflict(source: str, patch: Patch, side: str, differ: dict[int, np.ndarray],
              hint: str = "") -> PatchConflictError:
    n = sum(len(r) for r in differ.values())
    where = "; ".join(f"layer {layer}: rows {_row_list(rows)}"
                      for layer, rows in sorted(differ.items()))
    return PatchConflictError(f"{source}: {n} of {patch.rows_touched} rows differ from the "
                              f"patch's {side}-rows ({where}); nothing was changed{hint}")


def _check_apply(files: ModelFiles, table: MemoryTable, patch: Patch, source: str,
                 rows: bool = True) -> None:
    problems = _static_problems(files, table, patch, source)
    if problems:
        raise BadInputError(problems)
    if not rows:
        return
    differ = _differing(table, patch, "before")
    if differ:
        applied = not _differing(table, patch, "after")
        hint = " (its after-rows are in place: was it applied already?)" if applied else ""
        raise _conflict(source, patch, "before", differ, hint)


def check_patch(files: ModelFiles, patch: Patch, source: str = "patch") -> None:
    """Everything ``apply_patch`` checks before writing, reading only the touched rows.

    Writes nothing and creates nothing, so a caller can check against the bundled model before
    copying it (target.py).

    Args:
        files (`ModelFiles`): the model (and plugged memory) the patch is for.
        patch (`Patch`): the patch.
        source (`str`, defaults to "patch"): how messages name the patch, e.g. its file name.

    Raises:
        MismatchError: the patch was made for another memory (both fingerprints named).
        BadInputError: unknown layer, wrong width or row dtype, row ids out of range.
        PatchConflictError: current rows differ from the patch's before-rows (count named).
    """
    with files.table() as table:
        _check_apply(files, table, patch, source)


# --- writing -----------------------------------------------------------------------------------

_TARGET = {"apply": "after", "undo": "before"}  # the side an op writes
_PRIOR = {"apply": "before", "undo": "after"}  # the side it overwrites


def _write_rows(table: MemoryTable, patch: Patch, side: str) -> None:
    for e in patch.edits:
        table.write_raw(e.layer_id, e.rows, e.after if side == "after" else e.before)
    table.flush()


def _finish(folder: Path, op: str, entry: HistoryEntry) -> None:
    """Steps 4-6: commit the journal, record the op in history, delete the journal."""
    store.write_journal(folder, JournalRecord(op, "committed", entry))
    entries = [e for e in store.read_history(folder) if e.seq != entry.seq]
    store.write_history(folder, entries + [entry])
    store.delete_journal(folder)


def _roll_back(folder: Path, table: MemoryTable, op: str, entry: HistoryEntry,
               patch: Patch) -> None:
    _write_rows(table, patch, _PRIOR[op])
    if op == "apply":
        (folder / entry.file).unlink(missing_ok=True)
    store.delete_journal(folder)


def _run(folder: Path, table: MemoryTable, op: str, entry: HistoryEntry, patch: Patch) -> None:
    """Steps 2-6 of one write; on an error in this process the rows are rolled back at once
    (and, should that fail too, by the next ``recover``)."""
    store.write_journal(folder, JournalRecord(op, "pending", entry))
    try:
        _write_rows(table, patch, _TARGET[op])
    except BaseException:
        try:
            _roll_back(folder, table, op, entry, patch)
        except Exception:
            logger.exception("rolling back %s of %s failed; the next open recovers it",
                             op, entry.label)
        raise
    _finish(folder, op, entry)


def _recover_locked(folder: Path, table: MemoryTable) -> RecoveryReport | None:
    journal = store.read_journal(folder)
    report = None
    if journal is not None:
        op, entry = journal.op, journal.entry
        patch = store.load_copy(folder, entry)
        if journal.state == "pending":
            _roll_back(folder, table, op, entry, patch)
            report = RecoveryReport(folder, op, entry, "rolled back")
        else:
            _write_rows(table, patch, _TARGET[op])
            _finish(folder, op, entry)
            report = RecoveryReport(folder, op, entry, "rolled forward")
    store.remove_strays(folder, {e.file for e in store.read_history(folder)})
    return report


def _check_writable(files: ModelFiles) -> None:
    """The bundled model is refused; so are rows or a folder this user cannot write."""
    _refuse_bundled(files)
    ids = files.config.engram_layer_ids
    rows = {loc.path for name, loc in files.tensors.items() if is_memory_tensor(name, ids)}
    locked = sorted(str(p) for p in rows | {files.memory_dir} if not os.access(p, os.W_OK))
    if locked:
        raise BadInputError([f"{p}: not writable by you; nothing was changed" for p in locked])


def _settled(files: ModelFiles) -> bool:
    """Whether no write can be under way or interrupted, so rows may be checked without the
    lock: a writer makes the lock file before anything else and leaves it behind."""
    folder = engram_dir(files)
    return not (folder / store.LOCK_FILE).exists() and store.read_journal(folder) is None


@contextlib.contextmanager
def _writer(files: ModelFiles, wait: bool
            ) -> Iterator[tuple[Path, MemoryTable, RecoveryReport | None]]:
    folder = engram_dir(files)
    with store.hold_lock(folder, wait), files.table(writable=True) as table:
        yield folder, table, _recover_locked(folder, table)


def recover(files: ModelFiles, wait: bool = False) -> RecoveryReport | None:
    """Finish or roll back an interrupted apply or undo (the rule is in the module docstring).

    Without a journal this takes no lock and writes nothing.

    Returns:
        `RecoveryReport` or None: what was recovered, None when there was nothing to do.

    Raises:
        LockHeldError: a journal exists and another process holds the lock (without ``wait``).
    """
    if store.read_journal(engram_dir(files)) is None:
        return None
    with _writer(files, wait) as (_, _, report):
        return report


def apply_patch(files: ModelFiles, patch: Patch, name: str, wait: bool = False) -> ApplyReport:
    """Write a patch's after-rows in place under the journal, and record it in the history.

    Every check of ``check_patch`` runs first; a refused patch creates nothing (no ``.engram/``,
    no lock). Then, holding the lock, an interrupted write is recovered, the checks run again,
    and the patch is copied to ``.engram/patches/NNNN-NAME.patch.safetensors`` and written.

    Args:
        files (`ModelFiles`): rows are written in ``files.memory_dir``; never the bundled model.
        patch (`Patch`): made against this memory (same fingerprint, rows equal its before).
        name (`str`): history name: letters, digits, ``.``, ``_``, ``-`` (see ``patch_name``).
        wait (`bool`, defaults to False): wait for another writer instead of failing.

    Returns:
        `ApplyReport`: the history entry, the copy's path and any recovery done first.

    Raises:
        MismatchError, BadInputError, PatchConflictError: see ``check_patch``; LockHeldError.

    Example:
        >>> report = apply_patch(open_model("model"), read_patch("fix.patch.safetensors"),
        ...                      "fix")  # doctest: +SKIP
    """
    store.check_name(name)
    _check_writable(files)
    with files.table() as table:
        _check_apply(files, table, patch, name, rows=_settled(files))
    with _writer(files, wait) as (folder, table, recovered):
        _check_apply(files, table, patch, name)
        seq = store.next_seq(folder, store.read_history(folder))
        rel = f"{store.PATCHES_DIR}/{seq:04d}-{name}{PATCH_SUFFIX}"
        copy = write_patch(patch, folder / rel)
        entry = HistoryEntry(seq, name, rel, store.sha256_file(copy), store.now(),
                             patch.rows_touched, sum(int(e.changed.sum()) for e in patch.edits),
                             [e.layer_id for e in patch.edits], patch.fingerprint)
        try:
            _run(folder, table, "apply", entry, patch)
        except BaseException:
            if not (folder / store.JOURNAL_FILE).exists():
                copy.unlink(missing_ok=True)
            raise
    return ApplyReport(files.memory_dir, entry, copy, recovered)


# --- undo --------------------------------------------------------------------------------------

def _find_entry(folder: Path, entries: list[HistoryEntry], which: str | None) -> HistoryEntry:
    """The applied entry ``which`` names: None (the last), a seq, a patch file, or a name."""
    where = folder.parent
    applied = [e for e in entries if e.applied]
    if which is None:
        if not applied:
            raise BadInputError(f"{where}: no applied patch to undo")
        return applied[-1]
    if which.isdigit():
        found = [e for e in entries if e.seq == int(which)]
        if not found:
            raise BadInputError(f"{where}: no patch {int(which):04d} in the history (seqs "
                                f"{', '.join(str(e.seq) for e in entries) or 'none'})")
    elif Path(which).is_file():
        found = _entries_for_file(folder, entries, Path(which))
        if not found:
            raise PatchConflictError(f"{which}: not applied to {where} (no patch in its "
                                     f"history has the same rows); nothing to undo")
    else:
        found = [e for e in entries if which in (e.name, e.label, Path(e.file).name)]
        if not found:
            raise BadInputError(f"{where}: no patch named {which!r} in the history (applied: "
                                f"{', '.join(e.label for e in applied) or 'none'})")
    live = [e for e in found if e.applied]
    if not live:
        raise PatchConflictError(f"{where}: {found[-1].label} is not applied (undone at "
                                 f"{found[-1].undone_at}); nothing to undo")
    if len(live) > 1:
        raise BadInputError(f"{where}: {which!r} names {len(live)} applied patches ("
                            f"{', '.join(e.label for e in live)}); give the sequence number")
    return live[0]


def _entries_for_file(folder: Path, entries: list[HistoryEntry], path: Path
                      ) -> list[HistoryEntry]:
    """Entries whose copy is ``path`` byte for byte, else whose copy holds the same edits."""
    digest = store.sha256_file(path)
    same = [e for e in entries if e.sha256 == digest]
    if same:
        return same
    patch = read_patch(path)
    return [e for e in entries
            if set(e.layers) == {x.layer_id for x in patch.edits}
            and _same_edits(store.load_copy(folder, e), patch)]


def _same_edits(a: Patch, b: Patch) -> bool:
    if a.fingerprint != b.fingerprint or len(a.edits) != len(b.edits):
        return False
    return all(x.layer_id == y.layer_id and np.array_equal(x.rows, y.rows)
               and x.before.equals(y.before) and x.after.equals(y.after)
               for x, y in zip(a.edits, b.edits, strict=True))


def _plan_undo(files: ModelFiles, folder: Path, table: MemoryTable, which: str | None
               ) -> tuple[HistoryEntry, Patch]:
    entries = store.read_history(folder)
    entry = _find_entry(folder, entries, which)
    patch = store.load_copy(folder, entry)
    problems = _static_problems(files, table, patch, entry.label)
    if problems:
        raise BadInputError(problems)
    touched = {e.layer_id: e.rows for e in patch.edits}
    later = []
    for other in (e for e in entries if e.applied and e.seq > entry.seq):
        overlap = sum(np.intersect1d(touched.get(x.layer_id, []), x.rows).size
                      for x in store.load_copy(folder, other).edits)
        if overlap:
            later.append((other, overlap))
    if later:
        names = ", ".join(f"{o.label} ({n} rows)" for o, n in later)
        first = " then ".join(o.label for o, _ in reversed(later))
        raise PatchConflictError(f"{files.memory_dir}: cannot undo {entry.label}: later "
                                 f"patches changed the same rows: {names}; undo {first} first")
    differ = _differing(table, patch, "after")
    if differ:
        raise _conflict(entry.label, patch, "after", differ)
    return entry, patch


def undo_patch(files: ModelFiles, which: str | None = None, wait: bool = False) -> UndoReport:
    """Restore the before-rows of an applied patch, bit for bit, under the journal.

    Refused, changing nothing, when the patch is not applied, when a later applied patch touched
    any of its rows (that patch is named: undo it first), or when its rows no longer equal its
    after-rows.

    Args:
        files (`ModelFiles`): the model (and plugged memory) the patch was applied to.
        which (`str`, *optional*): a sequence number, a name (``fix-wales`` or ``0003-fix-wales``)
            or a patch file; None undoes the last applied patch.
        wait (`bool`, defaults to False): wait for another writer instead of failing.

    Returns:
        `UndoReport`: the history entry, now with ``undone_at``.

    Raises:
        BadInputError: nothing applied, or ``which`` names no patch or several.
        PatchConflictError: not applied, a later patch in the way, or rows changed since.
        LockHeldError: another writer holds the lock.

    Example:
        >>> undo_patch(open_model("model"), "fix-wales")  # doctest: +SKIP
    """
    folder = engram_dir(files)
    journal = store.read_journal(folder)
    if journal is None and not store.read_history(folder):
        raise BadInputError(f"{files.memory_dir}: no patch has been applied here; nothing to "
                            f"undo")
    _check_writable(files)
    if _settled(files):
        with files.table() as table:
            _plan_undo(files, folder, table, which)
    with _writer(files, wait) as (folder, table, recovered):
        entry, patch = _plan_undo(files, folder, table, which)
        entry.undone_at = store.now()
        _run(folder, table, "undo", entry, patch)
    return UndoReport(files.memory_dir, entry, recovered)


# --- reading -----------------------------------------------------------------------------------

def history(files: ModelFiles) -> list[HistoryEntry]:
    """Every patch applied to ``files.memory_dir`` in seq order, undone ones marked; no lock."""
    return store.read_history(engram_dir(files))


def verify(files: ModelFiles, wait: bool = False) -> VerifyReport:
    """Recover an interrupted write, then check every applied patch against the table.

    A row's expected bytes are the after-bytes of the last applied patch that touched it; only
    touched rows are read. Each copy is checked against its sha256 and the fingerprint against
    the memory's. Problems are reported, not raised.

    Returns:
        `VerifyReport`: ``ok`` when the journal was clean or recovered and every row is in place.

    Raises:
        LockHeldError: another writer holds the lock (without ``wait``).
    """
    folder = engram_dir(files)
    recovered = recover(files, wait)
    report = VerifyReport(files.memory_dir, recovered is None, recovered)
    if not folder.is_dir():
        return report
    fp = files.fingerprint()
    with store.hold_lock(folder, wait), files.table() as table:
        loaded: list[tuple[HistoryEntry, Patch]] = []
        for e in (e for e in store.read_history(folder) if e.applied):
            try:
                loaded.append((e, store.load_copy(folder, e)))
            except BadInputError as err:
                report.problems += err.problems
                report.patches.append(PatchCheck(e.seq, e.name, e.rows, 0, 0, False))
            if e.fingerprint != fp:
                report.problems.append(f"{e.label}: made for memory {e.fingerprint[:12]}, this "
                                       f"memory is {fp[:12]}")
        superseded, differ = _compare(table, [p for _, p in loaded])
    for i, (e, _) in enumerate(loaded):
        report.patches.append(PatchCheck(e.seq, e.name, e.rows, int(superseded[i]),
                                         int(differ[i]), True))
        if differ[i]:
            report.problems.append(f"{e.label}: {differ[i]} of its {e.rows} rows no longer "
                                   f"hold its after-rows")
    report.patches.sort(key=lambda c: c.seq)
    return report


def _compare(table: MemoryTable, patches: list[Patch]) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (in seq order): rows a later patch wrote again, rows not holding its after."""
    superseded = np.zeros(len(patches), np.int64)
    differ = np.zeros(len(patches), np.int64)
    by_layer: dict[int, list[tuple[int, LayerEdit]]] = {}
    for i, p in enumerate(patches):
        for e in p.edits:
            by_layer.setdefault(e.layer_id, []).append((i, e))
    for layer, items in by_layer.items():
        if layer not in table.layer_ids:
            continue
        rows = np.concatenate([e.rows for _, e in items])
        owner = np.concatenate([np.full(len(e.rows), i) for i, e in items])
        data = np.concatenate([e.after.data for _, e in items])
        scaled = items[0][1].after.scale is not None
        scale = np.concatenate([e.after.scale for _, e in items]) if scaled else None
        # the last occurrence of each row id is the patch whose after-bytes it should hold
        _, first_in_reversed = np.unique(rows[::-1], return_index=True)
        last = len(rows) - 1 - first_in_reversed
        superseded += np.bincount(owner, minlength=len(patches)) - np.bincount(
            owner[last], minlength=len(patches))
        want = RawRows(data[last], None if scale is None else scale[last])
        same = table.read_raw(layer, rows[last]).row_equal(want)
        differ += np.bincount(owner[last][~same], minlength=len(patches))
    return superseded, differ
