"""`eval --ablate` on probe files (the total row, one row per relation and phrasing, JSON), and
the edit metric set against its definitions, recomputed here from the logits."""

import json

import numpy as np
import torch
from typer.testing import CliRunner

from commands.main import app
from conftest import make_tiny_model
from engram_edit.checkpoint import load_model
from engram_edit.edit.facts import Fact, scored_target
from engram_edit.eval import (
    Probe,
    fact_ablation,
    fact_metrics,
    read_probes,
    relation_group,
    score_completions,
)

PROBES = [
    {"prompt": "The capital of France is", "target": " Paris", "relation": "capital",
     "phrasing": "trained"},
    {"prompt": "France has its capital in", "target": " Paris", "relation": "capital",
     "phrasing": "heldout"},
    {"prompt": "The capital of Peru is", "target": " Lima", "relation": "capital",
     "phrasing": "trained"},
    {"prompt": "Iron has the symbol", "target": " Fe", "relation": "element_symbol",
     "phrasing": "trained"},
    {"prompt": "the Milky", "target": " Way", "count": 40},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_probes_default_to_entity_completions_in_trained_wording(tmp_path):
    probes = read_probes(_write(tmp_path / "p.jsonl", PROBES))
    assert probes[0] == Probe("The capital of France is", " Paris", "capital", "trained")
    assert probes[-1] == Probe("the Milky", " Way", "entity", "trained", 40)


def test_a_phrasing_other_than_trained_or_heldout_is_refused(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{**PROBES[0], "phrasing": "seen"}])
    result = CliRunner().invoke(app, ["eval", "--probes", str(path)])
    assert result.exit_code == 2
    assert f"{path}:1: phrasing: must be 'trained' or 'heldout'" in result.stderr


def test_rows_per_relation_and_phrasing_add_up_to_the_total(tmp_path):
    make_tiny_model(tmp_path / "m")
    files, model = load_model(tmp_path / "m", device="cpu")
    probes = read_probes(_write(tmp_path / "p.jsonl", PROBES))
    rows = fact_ablation(model, files.tokenizer, probes, group_by=[relation_group])
    assert [r.name for r in rows] == ["facts", "capital (trained)", "capital (heldout)",
                                      "element_symbol (trained)", "entity (trained)"]
    assert [r.items for r in rows] == [5, 2, 1, 1, 1]
    on = score_completions(model, files.tokenizer, [p.prompt for p in probes],
                           [p.target for p in probes], memory=True)
    assert rows[1].top1_memory == on.greedy[[0, 2]].mean()
    nll = -on.logprob[[0, 2]].sum() / on.tokens[[0, 2]].sum()
    assert abs(rows[1].loss_memory - nll) < 1e-9


def test_eval_ablate_json_has_a_row_per_group_and_no_nan(tmp_path):
    make_tiny_model(tmp_path / "m")
    probes = _write(tmp_path / "p.jsonl", PROBES)
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "the Milky Way is a galaxy " * 100}) + "\n")
    result = CliRunner().invoke(app, ["eval", "--ablate", "--model", str(tmp_path / "m"),
                                      "--probes", str(probes), "--heldout", str(held),
                                      "--windows", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert "NaN" not in result.stdout
    rows = {r["name"]: r for r in json.loads(result.stdout)["rows"]}
    assert set(rows) == {"facts", "capital (trained)", "capital (heldout)",
                         "element_symbol (trained)", "entity (trained)", "text"}
    for r in rows.values():
        assert r["kept"] is None or 0 <= r["kept"]
        assert (r["kept"] is None) == (r["top1_memory"] == 0)


def test_eval_windows_must_be_positive(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--windows", "0"])
    assert result.exit_code == 2
    assert "--windows: must be at least 1" in result.stderr
    assert "Traceback" not in result.output


def test_knowledge_bench_bars_follow_the_figures():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "knowledge_bench.py"
    spec = importlib.util.spec_from_file_location("knowledge_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = lambda on, off: {"top1_memory": on, "top1_no_memory": off}  # noqa: E731
    new = {"trained": row(0.9, 0.4), "heldout": row(0.4, 0.1),
           "entities": {"count>=10": row(0.75, 0.2)},
           "text": {**row(0.3, 0.25), "loss_memory": 4.05}}
    bars = bench.bars(new, valid_bar=4.08)
    assert bars == {"trained >= 0.8": True, "trained memory off <= half": True,
                    "heldout >= 0.5": False, "heldout memory off <= half": True,
                    "validation loss <= 4.0800": True, "entities count>=10 >= 0.7": True,
                    "text top-1 memory off >= 0.8 x on": True}
    assert not bench.bars({**new, "trained": row(0.9, 0.5)}, 4.08)["trained memory off <= half"]


def _answer_scores(model, tokenizer, prompt, answer):
    """(mean log-prob per token, argmax tokens, answer tokens) of ``answer`` after ``prompt``."""
    p, a = tokenizer.encode(prompt), tokenizer.encode(scored_target(prompt, answer))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].float(), -1)
    pos = torch.arange(len(p) - 1, len(p) + len(a) - 1)
    return float(logp[pos, torch.tensor(a)].mean()), logp[pos].argmax(-1).tolist(), a


def test_the_metric_set_follows_its_definitions(tmp_path):
    make_tiny_model(tmp_path / "m")
    files, model = load_model(tmp_path / "m", device="cpu")
    tok = files.tokenizer
    facts = [Fact("Diana, Princess of", "Diana", "Wales", "France", ["Diana was Princess of"],
                  ["The capital of Spain is"], ["Madrid"], ["Charles, Prince of"], ["Wales"]),
             Fact("The capital of France is", "France", "Lima", "Paris")]
    m = fact_metrics(model, tok, facts)
    scores = [(_answer_scores(model, tok, f.prompt, f.target_new),
               _answer_scores(model, tok, f.prompt, f.ground_truth)) for f in facts]
    hits = [np.mean(np.array(top) == np.array(a)) for (_, top, a), _ in scores]
    assert m.reliability == np.mean(hits)
    assert m.says == np.mean([top == a for (_, top, a), _ in scores])
    lead = [np.exp(new) - np.exp(old) for (new, _, _), (old, _, _) in scores]
    assert np.isclose(m.efficacy_magnitude, np.mean(lead), atol=1e-6)
    assert m.efficacy == np.mean([x > 0 for x in lead])
    _, top, a = _answer_scores(model, tok, "Charles, Prince of", "Wales")
    assert m.portability == np.mean(np.array(top) == np.array(a))
    _, top, a = _answer_scores(model, tok, "Diana was Princess of", "Wales")
    assert m.generalization == np.mean(np.array(top) == np.array(a))
    assert m.locality == 1.0 and m.neighbourhood_unchanged == 1.0  # the model is its reference
    assert m.neighbourhood_kl == 0.0
    ans, _, _ = _answer_scores(model, tok, "The capital of Spain is", "Madrid")
    new, _, _ = _answer_scores(model, tok, "The capital of Spain is", "Wales")
    assert np.isclose(m.neighbourhood_magnitude, np.exp(ans) - np.exp(new), atol=1e-6)
