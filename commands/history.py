"""engram-edit apply, undo, history, verify and reset: patches written in place, journalled."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from commands._options import JsonOpt, MemoryOpt, ModelOpt
from commands._output import Output, human_bytes
from engram_edit import paths
from engram_edit.checkpoint import open_model
from engram_edit.edit.journal import (
    ApplyReport,
    UndoReport,
    VerifyReport,
    apply_patch,
    check_patch,
    history,
    undo_patch,
    verify,
)
from engram_edit.edit.patch import read_patch
from engram_edit.edit.store import HistoryEntry, patch_name
from engram_edit.edit.target import ResetReport, open_writable, reset
from engram_edit.errors import BadInputError

WaitOpt = Annotated[bool, typer.Option(
    "--wait", help="If another engram-edit is writing these rows, wait for it to finish "
                   "instead of stopping.")]


def apply_command(
    patch: Annotated[Path, typer.Argument(
        metavar="PATCH", help="A *.patch.safetensors file.", show_default=False)],
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Name in the history (default: from the file name).")] = None,
    wait: WaitOpt = False,
    json: JsonOpt = False,
) -> None:
    """Write a patch's rows into the model, in place and crash-safe.

    The patch must be made for this memory (same fingerprint) and the rows it
    touches must still hold its before-rows; otherwise nothing changes. A copy
    goes to .engram/patches/ and the write is journalled: a crash leaves the
    rows wholly before or wholly after. With no --model the bundled model is
    copied to your working copy first (`reset` removes it).

    Examples:
      engram-edit apply fix-wales.patch.safetensors
      engram-edit apply fix.patch.safetensors --model my-model --wait
      engram-edit apply fix.patch.safetensors --model backbone --memory memory --json
    """
    out = Output(json)
    value = read_patch(patch)
    files, note = open_writable(paths.resolve_model(model), memory,
                                lambda f: check_patch(f, value, str(patch)))
    report = apply_patch(files, value, name or patch_name(patch), wait=wait)
    for line in filter(None, [note, report.recovered and report.recovered.describe()]):
        out.note(line)
    out.result(report.to_dict(), lambda console: _render_apply(console, report))


def _render_apply(console: Console, r: ApplyReport) -> None:
    e = r.entry
    console.print(f"applied {e.label} to {r.path}: {e.rows} rows in layers "
                  f"{', '.join(map(str, e.layers)) or '-'} ({e.changed} changed)")
    console.print(f"copy {r.copy}")


def undo_command(
    patch: Annotated[str | None, typer.Argument(
        metavar="PATCH", help="Sequence number, name (fix-wales or 0003-fix-wales) or patch "
                                "file. Default: the last applied patch.",
        show_default=False)] = None,
    last: Annotated[bool, typer.Option("--last", help="Undo the last applied patch.")] = False,
    model: ModelOpt = None,
    memory: MemoryOpt = None,
    wait: WaitOpt = False,
    json: JsonOpt = False,
) -> None:
    """Restore the rows an applied patch replaced, bit for bit.

    Refused, changing nothing, when the patch is not applied, when a later
    patch changed some of the same rows (undo that one first), or when the
    rows no longer hold the patch's after-rows.

    Examples:
      engram-edit undo --last
      engram-edit undo 3
      engram-edit undo fix-wales --model my-model --json
    """
    out = Output(json)
    if patch is not None and last:
        raise BadInputError(f"give PATCH ({patch}) or --last, not both")
    files = open_model(paths.resolve_model(model).path, memory)
    report = undo_patch(files, patch, wait=wait)
    if report.recovered:
        out.note(report.recovered.describe())
    out.result(report.to_dict(), lambda console: _render_undo(console, report))


def _render_undo(console: Console, r: UndoReport) -> None:
    console.print(f"undid {r.entry.label} in {r.path}: {r.entry.rows} rows restored")


def history_command(model: ModelOpt = None, memory: MemoryOpt = None,
                    json: JsonOpt = False) -> None:
    """List the patches applied to a model, oldest first (undone ones marked).

    Examples:
      engram-edit history
      engram-edit history --model backbone --memory memory --json
    """
    out = Output(json)
    files = open_model(paths.resolve_model(model).path, memory)
    entries = history(files)
    out.result({"path": str(files.memory_dir), "patches": [e.to_dict() for e in entries]},
               lambda console: _render_history(console, files.memory_dir, entries, out))


def _render_history(console: Console, path: Path, entries: list[HistoryEntry],
                    out: Output) -> None:
    if not entries:
        console.print(f"no patch has been applied to {path}")
        return
    rows = [[f"{e.seq:04d}", e.name, e.applied_at, e.rows, e.changed,
             ", ".join(map(str, e.layers)), "applied" if e.applied else f"undone {e.undone_at}"]
            for e in entries]
    console.print(out.table(f"patches of {path}", ["seq", "name", "applied at", "rows",
                                                   "changed", "layers", "status"], rows))


def verify_command(model: ModelOpt = None, memory: MemoryOpt = None, wait: WaitOpt = False,
                   json: JsonOpt = False) -> None:
    """Check the journal and that every applied patch's rows are still in place.

    An interrupted apply or undo is recovered first. Only the touched rows are
    read. Exits 0 when all is in place, 1 when some rows changed or a patch
    copy is missing or damaged.

    Examples:
      engram-edit verify
      engram-edit verify --model my-model --json
    """
    out = Output(json)
    files = open_model(paths.resolve_model(model).path, memory)
    report = verify(files, wait=wait)
    if report.recovered:
        out.note(report.recovered.describe())
    out.result(report.to_dict(), lambda console: _render_verify(console, report, out))
    for line in report.problems:
        out.note(f"problem: {line}")
    if not report.ok:
        raise typer.Exit(1)


def _render_verify(console: Console, r: VerifyReport, out: Output) -> None:
    if r.patches:
        rows = [[f"{c.seq:04d}", c.name, c.rows, c.superseded, c.differ,
                 "ok" if c.copy_ok else "missing or damaged"] for c in r.patches]
        console.print(out.table(f"applied patches of {r.path}",
                                ["seq", "name", "rows", "rewritten later", "differ", "copy"],
                                rows))
    journal = "clean" if r.journal_clean else "recovered"
    verdict = "ok" if r.ok else f"{len(r.problems)} problem(s)"
    console.print(f"{r.path}: journal {journal}, {len(r.patches)} applied patch(es), {verdict}")


def reset_command(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before removing.")] = False,
    json: JsonOpt = False,
) -> None:
    """Remove your working copy of the bundled model, and the patches applied to
    it.

    Later runs use the bundled model again. Nothing to remove is not an error.

    Examples:
      engram-edit reset
      engram-edit reset --yes --json
    """
    out = Output(json)
    work = paths.working_copy_dir()
    if work.exists() and not yes:
        typer.confirm(f"Remove the working copy {work} and every patch applied to it?",
                      abort=True, err=True)
    report = reset()
    out.result(report.to_dict(), lambda console: _render_reset(console, report))


def _render_reset(console: Console, r: ResetReport) -> None:
    if not r.removed:
        console.print(f"no working copy at {r.path}; nothing to remove")
        return
    console.print(f"removed the working copy {r.path}: {r.files} files, "
                  f"{human_bytes(r.bytes)}, {r.applied} applied patch(es)")


def register(app: typer.Typer) -> None:
    app.command("apply")(apply_command)
    app.command("undo")(undo_command)
    app.command("history")(history_command)
    app.command("verify")(verify_command)
    app.command("reset")(reset_command)
