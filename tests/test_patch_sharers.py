"""Edits and the corpus n-gram index: each fact's report names the other n-grams
its rows serve, ``--rows auto`` leaves out crowded heads, and distill's locality term gets corpus
text ending with those n-grams. On a tiny random model whose small tables share many rows."""

import json
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

import engram_edit.edit.compute as compute
import engram_edit.edit.sharing as sharing
from commands.main import app
from conftest import make_tiny_model
from engram_edit.checkpoint import load_model
from engram_edit.edit.compute import EditSettings, edit_facts
from engram_edit.edit.costs import READ_COST_FLOOR, read_costs
from engram_edit.edit.distill import DistillResult
from engram_edit.edit.facts import Fact
from engram_edit.edit.locate import (
    RARE_NGRAM_COUNT,
    RowChoice,
    crowded_heads,
    locate_rows,
    tokenize_fact,
)
from engram_edit.edit.sharing import facts_sharing, own_ngrams, sharer_prompts
from engram_edit.index import NgramIndex, Sharer, own_index_file
from engram_edit.index_build import build_index

FACTS = [Fact("Diana, Princess of", "Diana", "Wales", "France",
              locality_prompts=["The capital of Spain is"], locality_answers=["Madrid"]),
         Fact("The capital of France is", "France", "Lima", "Paris")]
WORDS = ("the cat sat on a mat while Diana of Wales and the Princess of Spain ran to Paris "
         "in spring with the capital of France").split()


def corpus_texts(n: int = 60) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 14))) for _ in range(n)]


def write_corpus(path):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()))
    return path


@pytest.fixture
def indexed(tmp_path):
    """A tiny model with its own index (in .engram/, where `patch` finds it) of a corpus."""
    root = tmp_path / "sharers"
    make_tiny_model(root / "model")
    files, model = load_model(root / "model", device="cpu")
    corpus = write_corpus(root / "corpus.jsonl")
    build_index([corpus], files, own_index_file(files))
    return files, model, NgramIndex.open(own_index_file(files), files), corpus


def located(files, index):
    tokens = [tokenize_fact(f, files.tokenizer) for f in FACTS]
    return tokens, [locate_rows(t, files.tokenizer, files.hasher, RowChoice.AUTO,
                                index.ngram_count) for t in tokens]


def test_the_report_lists_the_sharers_the_index_gives_for_the_touched_rows(indexed,
                                                                          monkeypatch):
    files, _, index, _ = indexed
    tokens, rows = located(files, index)
    capped = facts_sharing(index, tokens, rows)
    cap = sharing.REPORTED_SHARERS
    monkeypatch.setattr(sharing, "REPORTED_SHARERS", 10**6)
    for t, fr, full, top in zip(tokens, rows, facts_sharing(index, tokens, rows), capped,
                                strict=True):
        own = own_ngrams(index, t)
        expected = Counter(s for lid, layer_rows in fr.rows.items()
                           for row in layer_rows.tolist()
                           for s in index.sharers(lid, row, exclude=own))
        assert Counter(Sharer(s.text, s.count) for s in full.sharers
                       for _ in range(s.rows)) == expected
        assert full.rows == {lid: len(r) for lid, r in fr.rows.items()}
        assert top.sharers == full.sharers[:cap]
        assert top.more_sharers == len(full.sharers) - cap > 0
        counts = [s.count for s in full.sharers]
        assert counts == sorted(counts, reverse=True)


def test_a_crowded_head_is_left_out_and_at_least_half_are_kept():
    def crowded(loads: list[int]) -> list[int]:
        return np.flatnonzero(crowded_heads(np.array(loads))).tolist()

    assert crowded([100, 120, 900, 110]) == [2]
    assert crowded([100, 120, 300, 110]) == []
    assert crowded([0, 1000]) == [1]  # a median of 0 counts as 1
    assert crowded([0, 0, 50, 60]) == [2, 3]
    assert crowded([5000]) == []
    rng = np.random.default_rng(0)
    for _ in range(200):
        loads = rng.integers(0, 50, size=rng.integers(1, 9)) ** 3
        assert crowded_heads(loads).sum() <= len(loads) // 2
    many = rng.integers(0, 50, size=(30, 4)) ** 3  # n-grams at once: each row on its own
    assert (crowded_heads(many) == np.stack([crowded_heads(r) for r in many])).all()


def test_auto_leaves_out_the_crowded_head_and_keeps_the_others(indexed):
    files, _, _, _ = indexed
    h, tok = files.hasher, files.tokenizer
    tokens = tokenize_fact(FACTS[0], tok)
    lid = h.layer_ids[0]
    every = h.rows(tok.compress(tokens.sequence)[None, :])[lid][0]
    subject = [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # n-grams holding "Diana" (token 0)
    uses = [int(every[p, h.column(o, j)]) for p, o in subject for j in range(h.n_heads)]
    crowded = next(r for r in uses if uses.count(r) == 1)
    loads = {i: np.full(h.rows_per_layer[i], RARE_NGRAM_COUNT, np.int64) for i in h.layer_ids}
    loads[lid][crowded] += 1000  # own count 20 everywhere: only this row has other n-grams

    def common(ids):
        return RARE_NGRAM_COUNT  # no final n-gram is rare: auto is the subject's rows

    plain = locate_rows(tokens, tok, h, RowChoice.AUTO, common)
    spared = locate_rows(tokens, tok, h, RowChoice.AUTO, common, loads)
    literal = locate_rows(tokens, tok, h, RowChoice.SUBJECT, common, loads)
    assert spared.left_out == 1 and plain.left_out == literal.left_out == 0
    assert spared.rows[lid].tolist() == [r for r in plain.rows[lid].tolist() if r != crowded]
    assert all(np.array_equal(spared.rows[i], plain.rows[i]) for i in h.layer_ids if i != lid)
    assert np.array_equal(literal.rows[lid], plain.rows[lid])


def test_a_row_costs_what_the_corpus_reads_of_it_relative_to_the_median_row(indexed):
    files, _, index, _ = indexed
    costs = read_costs({lid: index.slot_loads(lid)[1] for lid in files.hasher.layer_ids})
    for lid in files.hasher.layer_ids:
        occurrences = index.slot_loads(lid)[1]
        assert costs[lid].shape == occurrences.shape
        assert costs[lid].min() >= READ_COST_FLOOR
        busiest, typical = int(np.argmax(occurrences)), np.median(occurrences)
        assert costs[lid][busiest] == pytest.approx(occurrences[busiest] / typical)
        above = occurrences >= READ_COST_FLOOR * typical  # the floor applies below this
        order = np.argsort(occurrences[above], kind="stable")
        assert (np.diff(costs[lid][above][order]) >= 0).all()


def test_sharer_contexts_end_with_the_sharer(indexed):
    files, _, index, corpus = indexed
    tokens, rows = located(files, index)
    sharing = facts_sharing(index, tokens, rows)
    prompts = sharer_prompts(index, sharing, 3, [corpus])
    tok = files.tokenizer
    for report, mine in zip(sharing, prompts, strict=True):
        assert report.contexts == len(mine) > 0
        for p in mine:
            assert any(tuple(tok.compress(p)[-len(s.ids):].tolist()) == s.ids
                       for s in report.sharers[:3])


def capture_distill(monkeypatch):
    seen = {}

    def fake(model, tokens, fact_rows, locality, *args):
        seen["locality"] = locality
        return DistillResult({}, [], [])

    monkeypatch.setattr(compute, "distill", fake)
    return seen


def test_edit_facts_adds_sharer_contexts_to_each_facts_locality_prompts(indexed, monkeypatch):
    files, model, index, corpus = indexed
    seen = capture_distill(monkeypatch)
    settings = EditSettings(measure=False, skip_crowded=False, sharer_contexts=2)
    report = edit_facts(files, model, FACTS, settings, index=index, corpus=[corpus])
    tokens, rows = located(files, index)
    extra = sharer_prompts(index, facts_sharing(index, tokens, rows), 2, [corpus])
    own = [[files.tokenizer.encode(p) for p in f.locality_prompts] for f in FACTS]
    assert seen["locality"] == [a + b for a, b in zip(own, extra, strict=True)]
    assert [s.contexts for s in report.sharing] == [len(e) for e in extra]
    assert "sharing" in report.patch.metadata and report.notes == []


def test_without_the_corpus_the_edit_goes_on_with_a_note(indexed, monkeypatch, tmp_path):
    files, model, _, _ = indexed
    gone = write_corpus(tmp_path / "gone.jsonl")
    build_index([gone], files, tmp_path / "index.safetensors")
    index = NgramIndex.open(tmp_path / "index.safetensors", files)
    gone.unlink()
    seen = capture_distill(monkeypatch)
    report = edit_facts(files, model, FACTS, EditSettings(measure=False), index=index)
    assert len(report.notes) == 1 and "gone.jsonl" in report.notes[0]
    assert seen["locality"] == [[files.tokenizer.encode(p) for p in f.locality_prompts]
                                for f in FACTS]
    assert all(s.contexts == 0 for s in report.sharing)


def run(args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_patch_json_reports_rows_and_sharers_per_fact(indexed, tmp_path):
    files, _, _, _ = indexed
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"prompt": f.prompt, "subject": f.subject,
                                         "target_new": f.target_new}) + "\n" for f in FACTS))
    code, out, err = run(["patch", facts, "--model", files.path, "--dry-run", "--out",
                          tmp_path / "x.patch.safetensors", "--steps", "2", "--no-measure",
                          "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["notes"] == [] and len(result["sharing"]) == len(FACTS)
    first = result["sharing"][0]
    assert first["prompt"] == FACTS[0].prompt
    assert set(first) == {"prompt", "rows", "left_out", "slot_ngrams", "slot_occurrences",
                          "sharers", "more_sharers", "contexts"}
    assert set(first["sharers"][0]) == {"ngram", "count", "rows"}
    assert sum(sum(s["rows"].values()) for s in result["sharing"]) >= result["rows_touched"]


def test_patch_names_a_missing_corpus_file_and_exits_2(indexed, tmp_path):
    files, _, _, _ = indexed
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "Diana, Princess of", "subject": "Diana",
                                 "target_new": "Wales"}) + "\n")
    code, out, err = run(["patch", facts, "--model", files.path, "--dry-run", "--corpus",
                          tmp_path / "nope.jsonl"])
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"error: --corpus {tmp_path / 'nope.jsonl'}: no such "
                                        "file"]
