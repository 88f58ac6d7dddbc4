"""The one exception hierarchy of engram-edit; the CLI maps each class to an exit code and format.

Every error carries a list of problem lines (file, key or line named in each) so that a caller
can show them all at once; ``str(err)`` joins them.
"""

from __future__ import annotations


class EngramEditError(Exception):
    """Base class of every error the library raises on purpose."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        assert self.problems, "an error needs at least one problem line"
        super().__init__("\n".join(self.problems))


class BadInputError(EngramEditError):
    """A file, flag or value given by the user is wrong (missing, malformed, out of range)."""


class MismatchError(BadInputError):
    """Two things that must belong together do not (memory vs backbone, patch vs table)."""


class PatchConflictError(BadInputError):
    """A patch cannot be applied or undone because the rows are not in the expected state."""


class LockHeldError(EngramEditError):
    """Another writer holds the lock of a model or memory directory."""
