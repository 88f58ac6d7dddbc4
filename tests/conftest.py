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


TINY_TOKENIZER = GOLDEN / "tiny_tokenizer.json"


def tiny_config(**overrides):
    """A model small enough to build, run and save in milliseconds (tiny tokenizer: 500 ids)."""
    from engram_edit.config import EngramConfig

    settings = dict(vocab_size=500, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64, hc_mult=2,
                    engram_layer_ids=[0, 2], engram_max_ngram_size=3, engram_n_heads=2,
                    engram_head_dim=8, engram_vocab_size=[31, 37], engram_pad_token_id=2)
    settings.update(overrides)
    return EngramConfig(**settings)


def make_tiny_model(path, seed: int = 0, table_dtype: str | None = None, **overrides):
    """Build a random tiny model with non-zero rows everywhere and save it to ``path``."""
    import torch

    from engram_edit.checkpoint import model_compression, save_model
    from engram_edit.model import EngramModel
    from engram_edit.tokenizer import EngramTokenizer

    tokenizer = EngramTokenizer.from_file(TINY_TOKENIZER)
    config = tiny_config(**overrides)
    torch.manual_seed(seed)
    model = EngramModel(config, model_compression(config, tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(model, tokenizer, path, table_dtype=table_dtype)
    return model, tokenizer


@pytest.fixture
def tiny_model_dir(tmp_path):
    path = tmp_path / "model"
    make_tiny_model(path)
    return path
