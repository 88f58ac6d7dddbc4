"""All output of the CLI: rich for people, bare JSON on stdout with --json, notes on stderr."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from engram_edit.tensorwrite import CopyProgress, ProgressFn


class Output:
    """One sink per command run; commands write only through it."""

    def __init__(self, json_mode: bool = False):
        self.json_mode = json_mode
        self.console = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)

    def json(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def result(self, obj: Any, render) -> None:
        """JSON under --json, else ``render(console)`` for people."""
        if self.json_mode:
            self.json(obj)
        else:
            render(self.console)

    def text(self, line: str) -> None:
        if not self.json_mode:
            self.console.print(line)

    def note(self, line: str) -> None:
        """A remark for people that is not the result (goes to stderr, never pollutes stdout)."""
        self.err.print(line, style="dim")

    def table(self, title: str | None, columns: list[str], rows: list[list[Any]],
              **kwargs: Any) -> Table:
        table = Table(title=title, title_justify="left", **kwargs)
        for name in columns:
            table.add_column(name)
        for row in rows:
            table.add_row(*[str(x) for x in row])
        return table


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


@contextlib.contextmanager
def byte_progress(output: Output, label: str) -> Iterator[ProgressFn]:
    """A byte progress bar on stderr (only on a terminal and without --json); yields the
    ``progress`` callback of split, join, convert-memory, import and export."""
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn()]
    disable = output.json_mode or not output.err.is_terminal
    with Progress(*columns, console=output.err, disable=disable, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(p: CopyProgress) -> None:
            bar.update(task, completed=p.done, total=p.total)

        yield update
