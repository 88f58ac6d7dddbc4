"""apply, undo, history, verify, reset from the command line: exit codes, JSON on stdout, stderr."""

import json
import subprocess
import sys

import numpy as np
import pytest
from test_journal import HOLD, SPREAD, digests, make_model, make_patch
from typer.testing import CliRunner

from commands.main import app
from engram_edit import paths
from engram_edit.checkpoint import open_model
from engram_edit.edit.patch import write_patch


def run(*args: str, code: int = 0, stdin: str | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=stdin)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def refused(*args: str, code: int = 2) -> str:
    """The one stderr line of a refused run (nothing on stdout)."""
    result = run(*args, code=code)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    return result.stderr


@pytest.fixture
def model(tmp_path):
    return make_model(tmp_path / "model", "float8_e4m3")


@pytest.fixture
def patch_file(model, tmp_path):
    patch = make_patch(open_model(model), SPREAD)
    return write_patch(patch, tmp_path / "fix-wales.patch.safetensors")


def test_apply_history_verify_undo_print_json_only(model, patch_file):
    original = digests(model)
    result = run("apply", patch_file, "--model", model, "--json")
    applied = json.loads(result.stdout)
    assert result.stderr == ""
    assert (applied["seq"], applied["name"], applied["rows"], applied["layers"]) == (
        1, "fix-wales", 6, [0, 2])
    assert applied["copy"] == str(model / ".engram/patches/0001-fix-wales.patch.safetensors")
    listed = json.loads(run("history", "--model", model, "--json").stdout)
    assert [(p["seq"], p["undone_at"]) for p in listed["patches"]] == [(1, None)]
    checked = json.loads(run("verify", "--model", model, "--json").stdout)
    assert checked["ok"] and checked["journal_clean"] and len(checked["patches"]) == 1
    undone = json.loads(run("undo", patch_file, "--model", model, "--json").stdout)
    assert undone["seq"] == 1 and undone["undone_at"]
    assert digests(model) == original


def words(*args: str) -> str:
    """stdout of a successful run with rich's line wrapping undone."""
    return " ".join(run(*args).stdout.split())


def test_people_get_sentences_and_tables(model, patch_file):
    assert "applied 0001-fix-wales to" in words("apply", patch_file, "--model", model)
    table = words("history", "--model", model)
    assert "fix-wales" in table and "applied" in table
    assert "journal clean, 1 applied patch(es), ok" in words("verify", "--model", model)
    assert "undid 0001-fix-wales" in words("undo", "--last", "--model", model)
    assert "undone" in words("history", "--model", model)


def test_a_patch_for_changed_rows_exits_2_and_changes_nothing(model, patch_file, tmp_path):
    stale = write_patch(make_patch(open_model(model), {0: [3]}, seed=7),
                        tmp_path / "stale.patch.safetensors")
    run("apply", patch_file, "--model", model)
    state = digests(model)
    line = refused("apply", stale, "--model", model)
    assert "1 of 1 rows differ from the patch's before-rows (layer 0: rows 3)" in line
    assert digests(model) == state


def test_a_patch_for_another_memory_exits_2_and_creates_nothing(model, tmp_path):
    patch = make_patch(open_model(model), {0: [1]})
    patch.fingerprint = "cd" * 32
    path = write_patch(patch, tmp_path / "other.patch.safetensors")
    assert "made for memory cdcdcdcdcdcd" in refused("apply", path, "--model", model)
    assert not (model / ".engram").exists()


def test_undo_refusals_exit_2(model, patch_file, tmp_path):
    assert "no patch has been applied" in refused("undo", "--model", model)
    assert "not both" in refused("undo", "1", "--last", "--model", model)
    run("apply", patch_file, "--model", model)
    files = open_model(model)
    later = write_patch(make_patch(files, {2: [7, 8]}, seed=3),
                        tmp_path / "later.patch.safetensors")
    other = write_patch(make_patch(files, {0: [5]}, seed=4),
                        tmp_path / "other.patch.safetensors")
    run("apply", later, "--model", model)
    line = refused("undo", "fix-wales", "--model", model)
    assert "cannot undo 0001-fix-wales" in line and "undo 0002-later first" in line
    assert "other.patch.safetensors: not applied to" in refused("undo", other, "--model", model)


def test_a_held_lock_exits_3(model, patch_file):
    (model / ".engram").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(model / ".engram/lock"), "60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = refused("apply", patch_file, "--model", model, code=3)
        assert f"process {holder.pid} is writing" in line and "--wait" in line
    finally:
        holder.kill()
        holder.wait()
    run("apply", patch_file, "--model", model, "--wait")


def test_verify_exits_1_when_rows_changed(model, patch_file):
    run("apply", patch_file, "--model", model)
    files = open_model(model)
    with files.table(writable=True) as table:
        table.write_raw(0, np.array([3]), table.read_raw(0, np.array([4])))
    result = run("verify", "--model", model, "--json", code=1)
    assert json.loads(result.stdout)["ok"] is False
    assert result.stderr.strip() == ("problem: 0001-fix-wales: 1 of its 6 rows no longer hold "
                                     "its after-rows")


def test_without_model_writes_go_to_a_working_copy_that_reset_removes(tmp_path, monkeypatch):
    bundled = make_model(tmp_path / "pkg/bundled/model")
    monkeypatch.setattr(paths, "bundled_model_dir", lambda: bundled)
    shipped = digests(bundled)
    patch = write_patch(make_patch(open_model(bundled), {0: [1]}), tmp_path / "p.patch.safetensors")
    assert "no patch has been applied" in refused("undo")
    result = run("apply", patch, "--json")
    work = paths.working_copy_dir()
    assert json.loads(result.stdout)["path"] == str(work)
    assert result.stderr.split() == (f"copied the bundled model to {work}; `engram-edit reset` "
                                     f"removes it").split()
    assert json.loads(run("history", "--json").stdout)["path"] == str(work)
    assert digests(bundled) == shipped and not (bundled / ".engram").exists()
    run("reset", stdin="n\n", code=1)
    assert work.exists()
    removed = json.loads(run("reset", "--yes", "--json").stdout)
    assert removed["removed"] and removed["applied"] == 1 and not work.exists()
    assert "nothing to remove" in words("reset")
