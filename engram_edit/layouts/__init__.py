"""Checkpoint layouts engram-edit reads besides its own: the deepseek-ai/Engram demo and
DeepSeek-V4.1. One module each (demo.py, v4.py) declares the mapping; ``detect`` recognises a
directory from its config keys and tensor names, never from its path. docs/engram.md section 7.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from engram_edit.errors import BadInputError
from engram_edit.layouts import demo, v4
from engram_edit.layouts.base import CONFIG_FILE, OURS, read_config, tensor_names

LAYOUTS: dict[str, ModuleType] = {demo.NAME: demo, v4.NAME: v4}
OUR_MODEL_TYPE = "engram"


def get(name: str) -> ModuleType:
    """The layout module called ``name`` (BadInputError naming the known ones otherwise)."""
    if name not in LAYOUTS:
        raise BadInputError(f"unknown layout {name!r}; known layouts: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _declared(config: dict[str, Any]) -> str:
    for name, module in LAYOUTS.items():
        if module.claims(config):
            return name
    return OURS if config.get("model_type", OUR_MODEL_TYPE) == OUR_MODEL_TYPE else ""


def detect(path: str | Path) -> str:
    """Which layout a model directory is in: ``"engram-edit"``, ``"demo"`` or ``"v4"``.

    The config decides (V4.1: model_type deepseek_v41 with Engram keys in text_config; demo:
    the demo's n_embed_per_ngram and n_head_per_ngram fields; ours: model_type engram or none),
    then the tensor names confirm a foreign layout (``markers`` of its first Engram layer).
    A directory without a readable config.json counts as ours, so that the caller's own checks
    name what is missing.

    Raises:
        BadInputError: one line: an unknown layout, or a config whose tensors do not match it.

    Example:
        >>> detect("DeepSeek-V4.1-Flash")  # doctest: +SKIP
        'v4'
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        return OURS
    try:
        config = read_config(path)
    except BadInputError:
        return OURS
    name = _declared(config)
    if name == OURS:
        return OURS
    if not name:
        raise BadInputError(
            f"{path}: unknown layout: config.json has model_type "
            f"{config.get('model_type')!r}; engram-edit reads its own layout, the "
            f"deepseek-ai/Engram demo layout and DeepSeek-V4.1 (model_type {v4.MODEL_TYPE!r})")
    module = LAYOUTS[name]
    try:
        first = module.layer_ids(config)[0]
    except (IndexError, KeyError, TypeError):
        raise BadInputError(f"{path}: config.json declares the {name} layout but lists no "
                            f"Engram layer") from None
    markers = module.markers(first)
    if not set(markers) & tensor_names(path):
        raise BadInputError(f"{path}: unknown layout: config.json declares the {name} layout "
                            f"but there is no tensor {markers[0]}")
    return name
