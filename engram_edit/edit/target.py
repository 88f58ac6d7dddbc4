"""Where a writing verb writes: never into the bundled model.

Which model a verb reads is paths.resolve_model's; this module makes the working copy on the
first write, and removes it on reset. The writing itself is journal.py's.

A writing verb goes: resolve the model, open it, check its edit against it (nothing is created
when that fails), then ``writable_model`` and, if that returned another directory, open that one.
``open_writable`` does exactly this.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engram_edit import paths
from engram_edit.checkpoint import CONFIG_FILE, ModelFiles, open_model
from engram_edit.edit.store import ENGRAM_DIR, hold_lock, read_history
from engram_edit.errors import BadInputError
from engram_edit.fileio import atomic_dir, fsync_path
from engram_edit.paths import ModelChoice


def writable_model(choice: ModelChoice, memory: str | Path | None = None
                   ) -> tuple[Path, str | None]:
    """The directory a write for ``choice`` goes to, copying the bundled model on first use.

    Edits land in the memory directory when one is plugged in, so only a bundled model without
    ``memory`` is copied: atomically, to ``paths.working_copy_dir()``, which ``resolve_model``
    picks from then on. Two processes copying at once end up with one copy.

    Args:
        choice (`ModelChoice`): from ``paths.resolve_model``.
        memory (`str` or `Path`, *optional*): the plugged-in memory directory.

    Returns:
        `tuple[Path, str | None]`: the model directory to open, and a note for the user when a
        copy was made (None otherwise).

    Raises:
        BadInputError: the bundled model is missing.

    Example:
        >>> path, note = writable_model(resolve_model(None))  # doctest: +SKIP
    """
    if not choice.is_bundled or memory is not None:
        return choice.path, None
    work = paths.working_copy_dir()
    if (work / CONFIG_FILE).is_file():
        return work, None
    if not (choice.path / CONFIG_FILE).is_file():
        raise BadInputError(f"{choice.path}: the bundled model is missing (no {CONFIG_FILE}); "
                            f"pass --model DIR")
    try:
        # a leftover without config.json is a copy that never finished: replace it
        with atomic_dir(work, replace=work.exists()) as tmp:
            shutil.copytree(choice.path, tmp, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(ENGRAM_DIR))
    except OSError:
        if (work / CONFIG_FILE).is_file():  # another process made the copy first
            return work, None
        raise
    return work, f"copied the bundled model to {work}; `engram-edit reset` removes it"


def open_writable(choice: ModelChoice, memory: str | Path | None = None,
                  check: Callable[[ModelFiles], None] | None = None
                  ) -> tuple[ModelFiles, str | None]:
    """Open the model a write goes to, running ``check`` on the chosen model first.

    ``check`` (for example ``lambda f: check_patch(f, patch)``) raises to refuse; it runs before
    any copy is made, so a refused write creates nothing anywhere.

    Returns:
        `tuple[ModelFiles, str | None]`: the opened model and ``writable_model``'s note.
    """
    files = open_model(choice.path, memory)
    if check is not None:
        check(files)
    path, note = writable_model(choice, memory)
    if path != choice.path:
        files = open_model(path, memory)
    return files, note


@dataclass
class ResetReport:
    path: Path  # the working copy directory
    removed: bool  # False when there was none
    files: int
    bytes: int
    applied: int  # patches applied to it (they went with it)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def reset(wait: bool = False) -> ResetReport:
    """Remove the working copy of the bundled model; without one, report that nothing was there.

    The copy is renamed aside while its lock is held (so no write is cut off half-way), then
    deleted; ``resolve_model`` falls back to the bundled model.

    Raises:
        LockHeldError: a write to the working copy is under way (without ``wait``).
    """
    work = paths.working_copy_dir()
    if not work.exists():
        return ResetReport(work, False, 0, 0, 0)
    found = [p for p in work.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in found)
    engram = work / ENGRAM_DIR
    try:
        applied = sum(e.applied for e in read_history(engram))
    except BadInputError:
        applied = 0  # a damaged history goes with the copy
    aside = work.with_name(f".{work.name}.reset-{os.getpid()}")
    if engram.is_dir():
        with hold_lock(engram, wait):
            os.replace(work, aside)
    else:
        os.replace(work, aside)
    fsync_path(work.parent)
    shutil.rmtree(aside)
    return ResetReport(work, True, len(found), size, applied)
