"""The CLI's wiring and its error contract (exit codes, streams)."""

import subprocess
import sys

import typer
from typer.testing import CliRunner

from commands.main import VERBS, app, build_app


def _names(application: typer.Typer) -> set[str]:
    return {info.name for info in application.registered_commands}


def test_every_registered_verb_is_in_the_lazy_table():
    assert _names(app) == set(VERBS)


def test_a_run_imports_only_its_verbs_module():
    code = ("import sys; from commands.main import build_app; build_app('info'); "
            "print(sorted(m for m in sys.modules if m.startswith('commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "commands.info" in out and "commands.lookup" not in out
    assert _names(build_app("gates")) == {"lookup", "gates", "rows"}


def test_unknown_verb_and_bad_option_exit_2():
    runner = CliRunner()
    assert runner.invoke(app, ["nosuch"]).exit_code == 2
    assert runner.invoke(app, ["info", "--nosuch"]).exit_code == 2


def test_library_errors_become_one_line_on_stderr_and_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["info", "--model", str(tmp_path / "none"), "--json"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none'}: no such model directory"]


def test_info_json_on_the_bundled_model():
    import json

    result = CliRunner().invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "model"
    assert [t["layer_id"] for t in info["tables"]] == [0, 2]
    assert info["table_parameters"] > info["backbone_parameters"] * 0.5
