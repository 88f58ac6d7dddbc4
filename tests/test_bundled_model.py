"""The shipped model meets its bars (fixtures/model/TRAINING.md); cheap checks only."""

import json

import numpy as np
import pytest

from engram_edit.checkpoint import load_model
from engram_edit.eval import fact_ablation, read_probes, score_completions, text_ablation
from engram_edit.paths import bundled_heldout_file, bundled_model_dir, bundled_probes_file
from engram_edit.train import tokenize_texts


@pytest.fixture(scope="module")
def bundled():
    return load_model(bundled_model_dir(), device="cpu")


def test_bundled_model_is_found_and_small():
    files = sorted(p.name for p in bundled_model_dir().iterdir())
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(files)
    assert sum(p.stat().st_size for p in bundled_model_dir().iterdir()) <= 30_000_000


def test_frequent_entity_completions_live_in_the_memory(bundled):
    files, model = bundled
    records = [json.loads(line) for line in bundled_probes_file().read_text().splitlines()]
    frequent = [r for r in records if r["count"] >= 10]
    prompts = [r["prompt"] for r in frequent]
    targets = [r["target"] for r in frequent]
    on = score_completions(model, files.tokenizer, prompts, targets, memory=True).greedy.mean()
    off = score_completions(model, files.tokenizer, prompts, targets, memory=False).greedy.mean()
    assert on >= 0.70
    assert on - off >= 0.20


def test_facts_fall_much_more_than_plain_text_without_memory(bundled):
    files, model = bundled
    facts = fact_ablation(model, files.tokenizer, *read_probes(bundled_probes_file()))
    stream = np.asarray(tokenize_texts(bundled_heldout_file(), files.tokenizer))
    text = text_ablation(model, stream, windows=8)
    assert text.loss_memory < text.loss_no_memory  # memory on is clearly better
    assert facts.kept < 0.5 < text.kept
