"""Shared fixtures: golden data paths and an isolated user cache/data directory per test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path_factory, monkeypatch):
    """Caches and the working copy go to a throwaway home, never the developer's."""
    home = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.delenv("ENGRAM_EDIT_MODEL", raising=False)


@pytest.fixture(scope="session")
def golden_hashing() -> dict:
    return json.loads((GOLDEN / "hashing.json").read_text())


@pytest.fixture(scope="session")
def golden_compression() -> dict:
    return json.loads((GOLDEN / "compression.json").read_text())
