"""The shipped model meets its bars (fixtures/model/TRAINING.md); cheap checks only."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from commands.main import app
from engram_edit.checkpoint import load_model
from engram_edit.edit.facts import Fact, read_facts
from engram_edit.eval import (
    fact_ablation,
    greedy_hits,
    read_probes,
    score_completions,
    text_ablation,
)
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
    probes = read_probes(bundled_probes_file(), min_count=10)
    records = [json.loads(line) for line in bundled_probes_file().read_text().splitlines()]
    assert len(probes) == sum(r.get("count", 0) >= 10 for r in records) > 50
    prompts, targets = [p.prompt for p in probes], [p.target for p in probes]
    on = score_completions(model, files.tokenizer, prompts, targets, memory=True).greedy.mean()
    off = score_completions(model, files.tokenizer, prompts, targets, memory=False).greedy.mean()
    assert on >= 0.70
    assert on - off >= 0.20


def test_facts_fall_much_more_than_plain_text_without_memory(bundled):
    files, model = bundled
    facts = fact_ablation(model, files.tokenizer, read_probes(bundled_probes_file()))[0]
    stream = np.asarray(tokenize_texts(bundled_heldout_file(), files.tokenizer))
    text = text_ablation(model, stream, windows=8)
    assert text.loss_memory < text.loss_no_memory  # memory on is clearly better
    assert facts.kept < text.kept - 0.2  # facts lose far more than plain text (0.56 vs 0.85)


def test_eval_min_count_reports_the_frequent_probes_only(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--min-count", "10", "--windows", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    records = [json.loads(line) for line in bundled_probes_file().read_text().splitlines()]
    facts = next(r for r in out["rows"] if r["name"] == "facts")
    assert out["min_count"] == 10
    assert facts["items"] == sum(r.get("count", 0) >= 10 for r in records)


def test_min_count_needs_a_count_on_every_probe(tmp_path):
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "Sri", "target": " Lanka", "count": 40}\n'
                      '{"prompt": "the Milky", "target": " Way"}\n')
    assert [(p.prompt, p.target) for p in read_probes(probes)] == [("Sri", " Lanka"),
                                                                    ("the Milky", " Way")]
    counted = tmp_path / "counted.jsonl"
    counted.write_text(probes.read_text().replace('" Way"}', '" Way", "count": 12}'))
    assert [p.prompt for p in read_probes(counted, min_count=20)] == ["Sri"]
    result = CliRunner().invoke(app, ["eval", "--probes", str(probes), "--min-count", "5"])
    assert result.exit_code == 2
    assert f"{probes}:2: count: missing" in result.stderr
    assert "Traceback" not in result.output


def test_known_facts_are_the_true_facts_the_bundled_model_gets_right(bundled):
    files, model = bundled
    known = read_facts(Path(__file__).parents[1] / "fixtures" / "facts" / "known_facts.jsonl")
    assert len(known) >= 500
    assert greedy_hits(model, files.tokenizer, known).all()
    relations = [json.loads(line)["relation"] for line in
                 (Path(__file__).parents[1] / "fixtures" / "facts" / "known_facts.jsonl")
                 .read_text().splitlines()]
    probes = [Fact(p.prompt, p.prompt, p.target.strip())
              for p in read_probes(bundled_probes_file()) if p.relation == "entity"]
    right = {f.prompt for f, ok in zip(probes, greedy_hits(model, files.tokenizer, probes),
                                       strict=True) if ok}
    assert right == {f.prompt for f, r in zip(known, relations, strict=True) if r == "entity"}


def test_the_bundled_model_says_real_facts_in_their_trained_wording(bundled):
    files, model = bundled
    probes = [p for p in read_probes(bundled_probes_file())
              if p.relation != "entity" and p.phrasing == "trained"][::25]
    assert len({p.relation for p in probes}) >= 10
    prompts, targets = [p.prompt for p in probes], [p.target for p in probes]
    on = score_completions(model, files.tokenizer, prompts, targets, memory=True).greedy.mean()
    off = score_completions(model, files.tokenizer, prompts, targets, memory=False).greedy.mean()
    assert on >= 0.9 and off < on - 0.3
