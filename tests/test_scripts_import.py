"""Every script of bench/ and fixtures/recipe/ imports: a move or rename in the package that
breaks one of them fails here, not on the day someone runs it. Importing runs no benchmark and
builds nothing (each script's work sits behind ``if __name__ == "__main__"``)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("bench/*.py"), *ROOT.glob("fixtures/recipe/*.py")])


def test_the_scripts_are_all_found():
    names = {p.name for p in SCRIPTS}
    assert {"patch_bench.py", "weight_edits.py", "knowledge_bench.py",
            "build_fact_corpus.py", "build_known_facts.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_script_imports_without_running(script, monkeypatch):
    monkeypatch.syspath_prepend(str(script.parent))  # scripts import their neighbours
    spec = importlib.util.spec_from_file_location(f"_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert module.__doc__, f"{script.name} says what it is in its docstring"
