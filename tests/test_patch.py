"""Computing edits (locate, distill, overwrite), their metrics, and the patch, overwrite and eval
FACTS verbs, on tiny random models: small versions of the editing benchmark's bars."""

import dataclasses
import hashlib
import itertools
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from commands.main import app
from commands.patch import METRIC_KEYS
from conftest import make_tiny_model
from engram_edit import paths
from engram_edit.checkpoint import load_model, open_model
from engram_edit.edit import compute
from engram_edit.edit.compute import (
    EditSettings,
    Method,
    applied_facts,
    edit_facts,
    load_patch_rows,
)
from engram_edit.edit.costs import RowCosts
from engram_edit.edit.distill import DistillSettings, distill
from engram_edit.edit.facts import Fact
from engram_edit.edit.frozen import MAX_PARTS, PART_COST, length_parts
from engram_edit.edit.locate import (
    FactRows,
    RowChoice,
    group_facts,
    locate_rows,
    spells_subject,
    tokenize_fact,
)
from engram_edit.edit.overwrite import OverwriteSettings, closed_form
from engram_edit.edit.patch import read_patch
from engram_edit.edit.rows import NgramOp, ngram_rows, ngram_values
from engram_edit.eval import (
    FactMetrics,
    fact_metrics,
    greedy_hits,
    neighbour_reference,
    target_leads,
)

FACTS = [
    {"prompt": "Diana, Princess of", "subject": "Diana", "target_new": "Wales",
     "ground_truth": "France", "rephrase_prompt": ["Diana was Princess of"],
     "locality_prompt": ["The capital of Spain is"], "locality_ground_truth": ["Madrid"]},
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Lima",
     "ground_truth": "Paris", "locality_prompt": ["Charles, Prince of"],
     "locality_ground_truth": ["Wales"]},
    {"prompt": "Prince Albert of", "subject": "Albert", "target_new": "Wales"},
]
# strong enough to move a random tiny model, whose rows barely matter at first
# (its rows move the logits by a nat or so at most: "says" is asked with a lead of 0.3 nats)
STRONG = DistillSettings(steps=60, lr=0.3, norm_bound=100.0, heldout_windows=0, says_margin=0.3)


def run(args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model(path)
    return path


@pytest.fixture
def model_dir(base_model, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(base_model, path)
    return path


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


@pytest.fixture(scope="module")
def loaded(base_model):
    return load_model(base_model, device="cpu")


def facts():
    return [Fact(f["prompt"], f["subject"], f["target_new"], f.get("ground_truth"),
                 f.get("rephrase_prompt", []), f.get("locality_prompt", []),
                 f.get("locality_ground_truth", [])) for f in FACTS]


def wordings(fact):
    """The prompts distill fits for a fact: its own, and each rephrase prompt with the subject."""
    return [fact] + [replace(fact, prompt=r) for r in fact.rephrase_prompts if fact.subject in r]


def fitted_rows(files, fact):
    """The union of the rows of every wording of a fact, per layer."""
    rows = [locate_rows(tokenize_fact(w, files.tokenizer), files.tokenizer, files.hasher).rows
            for w in wordings(fact)]
    return {lid: np.unique(np.concatenate([r[lid] for r in rows])) for lid in rows[0]}


# --- locate ------------------------------------------------------------------------------------

def test_subject_rows_are_every_head_of_every_ngram_holding_a_subject_token(loaded):
    files, _ = loaded
    tokens = tokenize_fact(facts()[0], files.tokenizer)
    assert tokens.subject == [0]  # "Diana" is the first token
    rows = locate_rows(tokens, files.tokenizer, files.hasher, RowChoice.SUBJECT)
    h = files.hasher
    ids = files.tokenizer.compress(tokens.sequence)[None, :]
    every = h.rows(ids)
    # n-grams with token 0 end at positions 0 (orders 2, 3: pad-padded), 1 (orders 2, 3), 2 (3)
    wanted = {(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}
    for lid in h.layer_ids:
        expect = sorted({int(every[lid][0, p, h.column(o, j)]) for p, o in wanted
                         for j in range(h.n_heads)})
        assert rows.rows[lid].tolist() == expect


def test_auto_adds_a_final_ngram_only_when_the_index_says_it_is_rare(loaded):
    files, _ = loaded
    tokens = tokenize_fact(facts()[0], files.tokenizer)
    plain = locate_rows(tokens, files.tokenizer, files.hasher, RowChoice.AUTO)
    subject = locate_rows(tokens, files.tokenizer, files.hasher, RowChoice.SUBJECT)
    common = locate_rows(tokens, files.tokenizer, files.hasher, RowChoice.AUTO, lambda g: 10**6)
    rare = locate_rows(tokens, files.tokenizer, files.hasher, RowChoice.AUTO, lambda g: 0)
    both = locate_rows(tokens, files.tokenizer, files.hasher, RowChoice.BOTH)
    assert plain.count == subject.count == common.count < rare.count
    assert rare.count == both.count


def test_the_subject_s_own_spelling_is_an_ngram_ending_inside_it_that_reaches_no_context():
    subject = [3, 4, 5]
    assert spells_subject(range(3, 5), subject)  # its first two tokens: predicts the third
    assert not spells_subject(range(2, 4), subject)  # reaches the word before it
    assert not spells_subject(range(4, 6), subject)  # ends at its last token
    assert not spells_subject(range(5, 7), subject)  # ends after it
    assert spells_subject(range(-1, 1), [0, 1])  # at the start of the text
    assert spells_subject(range(-2, 1), [0, 1])
    assert not spells_subject(range(-1, 1), [0])  # a one-token subject spells nothing
    assert not spells_subject(range(0, 2), [])


def test_auto_leaves_out_the_rows_that_only_spell_the_subject(loaded):
    files, _ = loaded
    fact = Fact("The capital of Princess Diana is", "Princess Diana", "Lima")
    tokens = tokenize_fact(fact, files.tokenizer)
    first, last = tokens.subject[0], tokens.subject[-1]
    assert first > 0 and last - first >= 2
    h = files.hasher
    every = h.rows(files.tokenizer.compress(tokens.sequence)[None, :])
    auto = locate_rows(tokens, files.tokenizer, h, RowChoice.AUTO)
    # n-grams holding a subject token, but not those ending inside it before its last token
    # that start at or after its first token
    wanted = {(p, o) for p in range(tokens.predicting[-1] + 1) for o in range(2, h.max_ngram + 1)
              if p - o + 1 <= last and p >= first
              and not (first <= p - o + 1 and p < last)}
    for lid in h.layer_ids:
        expect = sorted({int(every[lid][0, p, h.column(o, j)]) for p, o in wanted
                         for j in range(h.n_heads)})
        assert auto.rows[lid].tolist() == expect


def test_facts_sharing_a_row_are_batched_together():
    a = FactRows({0: np.array([1, 2])})
    b = FactRows({0: np.array([5])})
    c = FactRows({0: np.array([2, 9])})
    assert group_facts([a, b, c], max_group=2) == [[0, 2], [1]]
    assert group_facts([a, b, c], max_group=1) == [[0], [2], [1]]


# --- computing edits ---------------------------------------------------------------------------

def test_distill_flips_a_tiny_models_predictions_and_leaves_the_model_as_it_was(loaded):
    files, model = loaded
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = edit_facts(files, model, facts(), EditSettings(distill=STRONG))
    assert report.before.efficacy < 1 and report.before.says == 0
    assert report.after.efficacy == 1.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    load_patch_rows(model, report.patch, "after")
    try:  # the quantized rows of the patch do it; without a ground truth, greedy gives it
        assert fact_metrics(model, files.tokenizer, facts()).efficacy == 1.0
        assert greedy_hits(model, files.tokenizer, facts()[2:]).all()
    finally:
        load_patch_rows(model, report.patch, "before")


def test_a_patch_touches_only_located_rows_and_records_how_it_was_made(loaded):
    files, model = loaded
    report = edit_facts(files, model, facts(), EditSettings(distill=STRONG))
    located = [fitted_rows(files, f) for f in facts()]
    prompt_only = [locate_rows(tokenize_fact(f, files.tokenizer), files.tokenizer,
                               files.hasher).rows for f in facts()]
    for e in report.patch.edits:
        allowed = np.unique(np.concatenate([fr[e.layer_id] for fr in located]))
        assert np.isin(e.rows, allowed).all()
    own = np.unique(np.concatenate([r[lid] for r in prompt_only for lid in r]))
    rephrased = np.concatenate([e.rows for e in report.patch.edits])
    assert not np.isin(rephrased, own).all()  # the rephrase prompt's own rows were fitted too
    meta = report.patch.metadata
    assert meta["method"] == "distill" and meta["fingerprint"] == files.fingerprint()
    assert [f["prompt"] for f in meta["facts"]] == [f["prompt"] for f in FACTS]
    assert meta["metrics"]["metrics_version"] >= 1
    assert meta["metrics"]["after"]["efficacy"] == report.after.efficacy
    assert meta["settings"]["distill"]["steps"] == STRONG.steps and meta["version"]


def test_the_same_facts_settings_and_seed_give_identical_rows(loaded):
    files, model = loaded
    settings = EditSettings(distill=DistillSettings(steps=5, heldout_windows=4, seed=3),
                            measure=False)
    stream = np.arange(3000) % 400
    a = edit_facts(files, model, facts(), settings, heldout=stream).patch
    b = edit_facts(files, model, facts(), settings, heldout=stream).patch
    assert [e.layer_id for e in a.edits] == [e.layer_id for e in b.edits]
    for x, y in zip(a.edits, b.edits, strict=True):
        assert np.array_equal(x.rows, y.rows) and x.after.equals(y.after)


def test_the_closed_form_moves_every_fact_toward_its_target_without_steps(loaded):
    files, model = loaded
    settings = EditSettings(method=Method.OVERWRITE,
                            overwrite=OverwriteSettings(norm_bound=100.0, iterations=3))
    report = edit_facts(files, model, facts(), settings)
    assert report.patch.metadata["method"] == "overwrite"
    assert report.after.efficacy > report.before.efficacy


def costly_row(files, model, tokens):
    """Row costs whose corpus reads are 1 everywhere but on the first layer's row that the
    plain closed form moves most: 1e6."""
    lid = files.hasher.layer_ids[0]
    rows = [locate_rows(t, files.tokenizer, files.hasher) for t in tokens]
    plain = closed_form(model, tokens, [t.truth for t in tokens], rows,
                        OverwriteSettings(norm_bound=100.0))
    costly = max(plain[lid][0].tolist(), key=lambda r: moved(plain, model, lid, r))
    reads = {i: np.ones(model.engram(i).embed.weight.shape[0]) for i in files.hasher.layer_ids}
    reads[lid][costly] = 1e6
    return rows, RowCosts.of_facts(rows, reads), lid, costly


def moved(values, model, lid, row):
    rows, new = values[lid]
    old = model.engram(lid).embed.weight.detach()[row]
    return float(np.linalg.norm(new[list(rows).index(row)] - old.numpy()))


def test_the_closed_form_moves_a_costly_row_least_and_uniform_costs_change_nothing(loaded):
    files, model = loaded
    tokens = [tokenize_fact(f, files.tokenizer) for f in facts()[:2]]
    truths = [t.truth for t in tokens]
    rows, costs, lid, costly = costly_row(files, model, tokens)
    settings = OverwriteSettings(norm_bound=100.0)
    untouched = RowCosts({})  # cost 1 everywhere
    plain = closed_form(model, tokens, truths, rows, settings, untouched)
    weighted = closed_form(model, tokens, truths, rows, settings, costs)
    uniform = closed_form(model, tokens, truths, rows, settings,
                          RowCosts({}, {i: np.full_like(c, 4.0) for i, c in costs.reads.items()}))
    assert all(np.array_equal(plain[i][1], closed_form(model, tokens, truths, rows, settings)[i][1])
               for i in files.hasher.layer_ids)
    assert moved(plain, model, lid, costly) > 0
    assert moved(weighted, model, lid, costly) < 1e-3 * moved(plain, model, lid, costly)
    for i in files.hasher.layer_ids:
        assert np.allclose(uniform[i][1], plain[i][1], atol=1e-5)
        others = plain[i][0] != costly if i == lid else slice(None)
        assert not np.allclose(weighted[i][1][others], plain[i][1][others])  # they take it up


def test_distill_runs_facts_in_several_batches_and_keeps_earlier_batches_solved(loaded):
    files, model = loaded
    one_by_one = DistillSettings(steps=60, lr=0.3, norm_bound=100.0, heldout_windows=0,
                                 batch_facts=1, says_margin=0.3)
    report = edit_facts(files, model, facts(), EditSettings(distill=one_by_one,
                                                            fit_rephrase_prompts=False))
    load_patch_rows(model, report.patch, "after")
    try:  # three batches of one fact; a fact solved in its batch is still solved at the end
        hits = [fact_metrics(model, files.tokenizer, [f]).efficacy == 1.0 for f in facts()]
    finally:
        load_patch_rows(model, report.patch, "before")
    solved = [i for i in range(len(FACTS)) if i not in report.unsolved]
    assert solved and all(hits[i] for i in solved)


WORDS = ["Charles", "Empire", "Great", "Milky", "Paulo", "Persian", "Prince", "Princess",
         "Wales", "Way", "conquered", "galaxy", "milky", "way", "the", "and", "Alexander", "THE",
         "GREAT"]  # one token each in the tiny tokenizer


def many_facts(n):
    """``n`` facts with distinct two-word subjects (their bigram is theirs alone)."""
    subjects = [f"{a} {b}" for a in WORDS for b in WORDS if a != b][:n]
    relations, targets = ["capital", "currency", "language"], ["Wales", "Lima", "Paris", "Madrid"]
    return [Fact(f"The {relations[i % 3]} of {s} is", s, targets[i % 4])
            for i, s in enumerate(subjects)]


def test_three_hundred_facts_run_in_several_batches_and_every_solved_fact_is_said(tmp_path):
    path = tmp_path / "wide"
    make_tiny_model(path, engram_vocab_size=[4001, 4003], engram_head_dim=16)
    files, model = load_model(path, device="cpu")
    batches = set()
    settings = EditSettings(distill=STRONG)
    report = edit_facts(files, model, many_facts(300), settings,
                        progress=lambda p: batches.add(p.batches))
    assert max(batches) >= 2  # more than one batch of 256
    assert report.facts == 300 and report.before.says == 0
    assert report.after.says >= 0.2  # a random tiny model's rows move its logits but little
    load_patch_rows(model, report.patch, "after")
    try:
        said = greedy_hits(model, files.tokenizer, many_facts(300))
    finally:
        load_patch_rows(model, report.patch, "before")
    solved = [i for i in range(300) if i not in report.unsolved]
    assert solved and said[solved].all()  # "solved" is what generate will print
    assert said.mean() == report.after.says


def test_an_unsolved_fact_is_reported_with_its_margin_and_what_held_its_rows(loaded):
    files, model = loaded
    held = DistillSettings(steps=2, lr=0.3, norm_bound=1e-3, heldout_windows=0, says_margin=0.3,
                           warm_start=False)  # a bound far below every row's norm
    report = edit_facts(files, model, facts(), EditSettings(distill=held))
    assert report.unsolved and [u.index for u in report.unsolved_facts] == report.unsolved
    wording_leads = []
    load_patch_rows(model, report.patch, "after")
    try:
        said = greedy_hits(model, files.tokenizer, facts())
        for f in facts():
            wording_leads.append(target_leads(model, files.tokenizer, wordings(f)).min())
    finally:
        load_patch_rows(model, report.patch, "before")
    rows = [fitted_rows(files, f) for f in facts()]
    for u in report.unsolved_facts:
        assert u.lead == pytest.approx(wording_leads[u.index], abs=1e-5)
        assert u.lead < held.says_margin
        if len(wordings(facts()[u.index])) == 1:
            assert bool(said[u.index]) == (u.lead > 0)  # the lead is what generate shows
        assert u.rows == sum(len(r) for r in rows[u.index].values()) > 0
        assert u.rows_at_bound == u.rows
        assert u.shares_rows_with == sum(
            any(np.intersect1d(rows[u.index][lid], rows[j][lid]).size for lid in rows[j])
            for j in range(len(rows)) if j != u.index)


def test_patch_json_lists_each_unsolved_fact_with_its_line_and_margin(model_dir, facts_file):
    code, out, err = run(["patch", facts_file, "--model", model_dir, "--steps", "1", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["unsolved"], "one step leaves facts unsolved on a random tiny model"
    for m in result["unsolved"]:
        assert FACTS[m["line"] - 1]["prompt"] == m["prompt"]
        assert set(m) == {"line", "prompt", "lead", "rows", "rows_at_bound", "shares_rows_with"}
        assert m["lead"] < 1.0  # short of the default goal's 1-nat margin
    code, out, err = run(["patch", facts_file, "--model", model_dir, "--steps", "1"])
    assert code == 0, err
    assert "least margin" in out and "line " in out


def test_prefers_is_the_weaker_goal_it_names(loaded):
    files, model = loaded
    settings = EditSettings(distill=DistillSettings(**{**vars(STRONG), "goal": "prefers"}))
    report = edit_facts(files, model, facts(), settings)
    assert report.patch.metadata["settings"]["distill"]["goal"] == "prefers"
    assert report.after.efficacy > report.before.efficacy


def test_distill_costs_count_the_kept_facts_touches_and_overwrite_the_batchs(loaded,
                                                                              monkeypatch):
    files, model = loaded
    seen = {}

    def spy(name, real):
        def call(*args, **kwargs):
            seen[name] = args[5] if name == "closed_form" else args[8]
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(compute, "distill", spy("distill", compute.distill))
    monkeypatch.setattr(compute, "closed_form", spy("closed_form", compute.closed_form))
    new, kept = facts()[:2], facts()[2:]
    edit_facts(files, model, new, EditSettings(distill=STRONG, measure=False), keep=kept)
    edit_facts(files, model, new, EditSettings(method=Method.OVERWRITE, measure=False))
    prompt_rows = {f.prompt: locate_rows(tokenize_fact(f, files.tokenizer), files.tokenizer,
                                         files.hasher).rows for f in facts()}
    # distill fits the new facts' rephrase prompts too and keeps the kept facts' prompts;
    # the closed form fits the prompts alone
    fitted = {**prompt_rows, **{f.prompt: fitted_rows(files, f) for f in new}}
    for name, counted, rows in (("distill", facts(), fitted), ("closed_form", new, prompt_rows)):
        for lid in files.hasher.layer_ids:
            every = np.concatenate([rows[f.prompt][lid] for f in counted])
            ids, times = np.unique(every, return_counts=True)
            assert np.array_equal(seen[name](lid, ids), times.astype(float))


def test_distill_leaves_a_costly_row_nearly_still(loaded):
    files, model = loaded
    tokens = [tokenize_fact(f, files.tokenizer) for f in facts()[:2]]
    rows, costs, lid, costly = costly_row(files, model, tokens)
    free = distill(model, tokens, rows, [[] for _ in tokens], STRONG)
    costed = distill(model, tokens, rows, [[] for _ in tokens], STRONG, row_cost=costs)
    assert moved(free.values, model, lid, costly) > 0
    assert moved(costed.values, model, lid, costly) < 1e-3 * moved(free.values, model, lid,
                                                                    costly)


def test_the_unedited_model_is_its_own_neighbourhood_reference(loaded):
    files, model = loaded
    ref = neighbour_reference(model, files.tokenizer, facts())
    m = fact_metrics(model, files.tokenizer, facts(), ref)
    assert m.neighbourhood_unchanged == 1.0 and m.neighbourhood_kl == pytest.approx(0, abs=1e-6)
    assert m.heldout_loss is None and m.paraphrase is not None


# --- overwrite NGRAM ---------------------------------------------------------------------------

def test_ngram_rows_are_one_per_head_at_the_last_token(loaded):
    files, _ = loaded
    rows = ngram_rows(files, " Princess of", heads=[1])
    ids = files.tokenizer.compress(files.tokenizer.encode(" Princess of"))[None, :]
    every = files.hasher.rows(ids)
    assert rows == {lid: [int(every[lid][0, -1, files.hasher.column(2, 1)])]
                    for lid in files.hasher.layer_ids}


def test_zero_copy_and_scale_give_the_rows_they_name(loaded):
    files, _ = loaded
    rows = ngram_rows(files, " Princess of", layers=[2])
    source = ngram_rows(files, " Prince of", layers=[2])
    with files.table() as table:
        assert not ngram_values(table, rows, NgramOp.ZERO)[2][1].any()
        copied = ngram_values(table, rows, NgramOp.COPY, source)[2][1]
        assert np.array_equal(copied, table.read_rows(2, source[2]))
        scaled = ngram_values(table, rows, NgramOp.SCALE, scale=0.5)[2][1]
        assert np.allclose(scaled, 0.5 * table.read_rows(2, rows[2]))


def test_overwrite_zero_applies_and_undo_restores_every_byte(model_dir):
    digest = sha256(model_dir / "model.safetensors")
    code, out, err = run(["overwrite", " Princess of", "--zero", "--model", model_dir, "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["rows_touched"] == 4 and result["op"] == "zero"
    with open_model(model_dir).table() as table:
        for lid, rows in result["rows"].items():
            assert not table.read_rows(int(lid), np.array(rows)).any()
    assert run(["undo", "--last", "--model", model_dir])[0] == 0
    assert sha256(model_dir / "model.safetensors") == digest


@pytest.mark.parametrize("args, what", [
    ([" Princess of"], "exactly one of"),
    ([" Princess of", "--zero", "--scale", "2"], "exactly one of"),
    ([" Princess", "--zero"], "1 token(s)"),
    ([" Princess of", "--zero", "--layer", "1"], "--layer 1: not an Engram layer"),
])
def test_overwrite_refuses_bad_requests_with_exit_2_and_changes_nothing(model_dir, args, what):
    before = tree(model_dir)
    code, out, err = run(["overwrite", *args, "--model", model_dir])
    assert code == 2 and out == "" and what in err
    assert tree(model_dir) == before


# --- the patch verb ----------------------------------------------------------------------------

def test_after_a_patch_generate_prints_the_target(model_dir, facts_file):
    code, out, err = run(["patch", facts_file, "--model", model_dir, "--steps", "60", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["after"]["says"] > result["before"]["says"]
    printed = []
    for f in FACTS:
        gen = CliRunner().invoke(app, ["generate", f["prompt"], "--model", str(model_dir),
                                       "--max-new-tokens", "4", "--json"])
        assert gen.exit_code == 0, gen.output
        printed.append(json.loads(gen.stdout)["completion"].startswith(" " + f["target_new"]))
    assert any(printed)
    assert sum(printed) / len(FACTS) == result["after"]["says"]  # says is what generate prints


def test_patch_applies_and_undo_restores_the_file_byte_for_byte(model_dir, facts_file):
    digest = sha256(model_dir / "model.safetensors")
    code, out, err = run(["patch", facts_file, "--model", model_dir, "--steps", "3", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"patch", "facts", "rows_touched", "seconds", "edits_per_s",
                           "before", "after", "goal", "unsolved", "sharing", "notes"}
    assert result["goal"] == "says"
    assert result["sharing"] is None  # the bundled index does not fit the tiny tokenizer
    assert tuple(result["after"]) == METRIC_KEYS  # the table's rows are the JSON's keys
    assert METRIC_KEYS == tuple(f.name for f in dataclasses.fields(FactMetrics))
    assert result["after"]["portability"] is None  # the file gives no portability prompts
    assert result["facts"] == 3 and result["rows_touched"] > 0
    patch = read_patch(result["patch"])
    assert result["patch"].startswith(str(model_dir / ".engram" / "patches"))
    assert sha256(model_dir / "model.safetensors") != digest
    assert patch.metadata["metrics"]["after"] == result["after"]
    assert run(["undo", "--last", "--model", model_dir])[0] == 0
    assert sha256(model_dir / "model.safetensors") == digest


def test_the_facts_of_applied_patches_are_kept_for_the_next_edit(model_dir, facts_file):
    assert run(["patch", facts_file, "--model", model_dir, "--steps", "1", "--no-measure"])[0] == 0
    kept = applied_facts(open_model(model_dir))
    assert [f.prompt for f in kept] == [f["prompt"] for f in FACTS]
    assert kept[0].ground_truth == "France" and kept[2].ground_truth is None
    assert run(["undo", "--last", "--model", model_dir])[0] == 0
    assert applied_facts(open_model(model_dir)) == []


def test_dry_run_writes_the_patch_file_and_changes_no_model(model_dir, facts_file, tmp_path):
    before = tree(model_dir)
    out_file = tmp_path / "fix.patch.safetensors"
    code, out, err = run(["patch", facts_file, "--model", model_dir, "--steps", "2",
                          "--no-measure", "--dry-run", "--out", out_file, "--json"])
    assert code == 0, err
    assert json.loads(out)["patch"] == str(out_file) and json.loads(out)["after"] is None
    assert read_patch(out_file).metadata["method"] == "distill"
    assert tree(model_dir) == before


def test_a_patch_for_another_memory_is_refused_with_one_line(model_dir, facts_file, tmp_path):
    out_file = tmp_path / "fix.patch.safetensors"
    assert run(["patch", facts_file, "--model", model_dir, "--steps", "1", "--no-measure",
                "--dry-run", "--out", out_file])[0] == 0
    other = tmp_path / "other"
    make_tiny_model(other, engram_seed=5)
    digest = sha256(other / "model.safetensors")
    code, _, err = run(["apply", out_file, "--model", other])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "memory" in err
    assert sha256(other / "model.safetensors") == digest


@pytest.mark.parametrize("line, field", [
    ("{oops", "line"),
    ({"prompt": "Diana, Princess of", "subject": "Charles", "target_new": "Wales"}, "subject"),
    ({"prompt": "Diana, Princess of", "subject": "Diana", "target_new": " "}, "target_new"),
])
def test_a_bad_fact_file_exits_2_with_its_line_and_creates_nothing(model_dir, tmp_path, line,
                                                                   field):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(FACTS[0]) + "\n" + (line if isinstance(line, str)
                                                   else json.dumps(line)) + "\n")
    before = tree(model_dir)
    for args in (["patch", bad, "--model", model_dir], ["patch", bad], ["eval", bad]):
        code, out, err = run(args)
        assert code == 2 and out == ""
        assert err.strip().splitlines() == [err.strip().splitlines()[0]]
        assert f"{bad}:2: {field}: " in err
    assert tree(model_dir) == before and not (tmp_path / "bad.patch.safetensors").exists()
    assert not paths.working_copy_dir().exists()


def test_eval_facts_reports_the_metric_set_with_memory_on_and_off(model_dir, facts_file):
    code, out, err = run(["eval", facts_file, "--model", model_dir, "--ablate", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["facts"] == 3 and set(result) >= {"memory", "no_memory", "metrics_version"}
    assert result["memory"]["neighbourhood_unchanged"] == 1.0


def test_length_parts_is_the_cheapest_grouping_of_the_length_order():
    def cost(parts: list[list[int]], lengths: list[int]) -> int:
        return sum(len(p) * max(lengths[i] for i in p) + PART_COST for p in parts)

    rng = np.random.default_rng(0)
    for _ in range(60):
        lengths = rng.choice([3, 9, 12, 16, 32, 300, 400], size=rng.integers(1, 9)).tolist()
        parts = length_parts(lengths)
        assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
        assert 1 <= len(parts) <= MAX_PARTS
        spans = [(min(lengths[i] for i in p), max(lengths[i] for i in p)) for p in parts]
        assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))  # runs of the length order
        ordered = sorted(lengths)
        best = min(  # every cut of the sorted lengths into at most MAX_PARTS runs
            sum(len(run) * run[-1] + PART_COST for run in np.split(ordered, list(cuts)))
            for k in range(MAX_PARTS)
            for cuts in itertools.combinations(range(1, len(ordered)), k))
        assert cost(parts, lengths) == best
