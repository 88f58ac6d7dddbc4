"""Where engram-edit finds and keeps things: the bundled model, the user's working copy, caches.

Which model a verb uses is decided here and nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

MODEL_ENV = "ENGRAM_EDIT_MODEL"
APP_NAME = "engram-edit"


def cache_dir() -> Path:
    """The user cache directory (``$XDG_CACHE_HOME/engram-edit`` on Linux); never a model dir."""
    return Path(platformdirs.user_cache_dir(APP_NAME))


def data_dir() -> Path:
    """The user data directory, home of the working copy of the bundled model."""
    return Path(platformdirs.user_data_dir(APP_NAME))


def bundled_model_dir() -> Path:
    """The small trained model shipped inside the package (``engram_edit/bundled/model``)."""
    return Path(__file__).resolve().parent / "bundled" / "model"


def bundled_probes_file() -> Path:
    """Entity completions mined from the bundled model's training corpus."""
    return Path(__file__).resolve().parent / "bundled" / "probes.jsonl"


def bundled_heldout_file() -> Path:
    """The bundled model's held-out validation documents (JSONL with "text")."""
    return Path(__file__).resolve().parent / "bundled" / "heldout.jsonl"


def working_copy_dir() -> Path:
    """The user's writable copy of the bundled model, made on the first write."""
    return data_dir() / "model"


@dataclass(frozen=True)
class ModelChoice:
    path: Path
    source: str  # "flag", "env", "working-copy" or "bundled"

    @property
    def is_bundled(self) -> bool:
        return self.source == "bundled"


def resolve_model(flag: str | Path | None) -> ModelChoice:
    """Pick the model directory: ``--model``, else ``$ENGRAM_EDIT_MODEL``, else the working copy
    (when one exists), else the bundled model. Nothing is checked or created here."""
    if flag is not None:
        return ModelChoice(Path(flag), "flag")
    env = os.environ.get(MODEL_ENV)
    if env:
        return ModelChoice(Path(env), "env")
    work = working_copy_dir()
    if (work / "config.json").is_file():
        return ModelChoice(work, "working-copy")
    return ModelChoice(bundled_model_dir(), "bundled")
