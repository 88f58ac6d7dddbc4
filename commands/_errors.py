"""The one mapping from library errors to exit codes and stderr lines."""

from __future__ import annotations

import os
import traceback

import typer

from engram_edit.errors import BadInputError, EngramEditError, LockHeldError

DEBUG_ENV = "ENGRAM_EDIT_DEBUG"
MAX_LINES = 5

# Subclasses before their bases: the first match wins.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (LockHeldError, 3),
    (BadInputError, 2),
    (EngramEditError, 1),
]


def problem_lines(problems: list[str]) -> list[str]:
    """At most five lines, then "... and N more"."""
    shown = problems[:MAX_LINES]
    if len(problems) > MAX_LINES:
        shown.append(f"... and {len(problems) - MAX_LINES} more")
    return shown


def exit_code(err: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(err, cls):
            return code
    return 1


def report(err: BaseException) -> int:
    """Write the error to stderr as plain lines and return the exit code."""
    if isinstance(err, EngramEditError):
        lines = problem_lines(err.problems)
    else:
        lines = [f"internal error: {type(err).__name__}: {err}",
                 f"(set {DEBUG_ENV}=1 to see the traceback)"]
    if os.environ.get(DEBUG_ENV):
        traceback.print_exception(err)
    for line in lines:
        typer.echo(f"error: {line}", err=True)
    return exit_code(err)


class ErrorMappingGroup(typer.core.TyperGroup):
    """Runs a command and turns any library error into stderr lines and an exit code."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # usage errors and explicit exits keep typer's own handling (exit 2 for usage)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as err:
            raise typer.Exit(report(err)) from None
