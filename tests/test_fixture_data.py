"""The shipped probe and fact files parse and keep their documented shape (no model needed).

Checks fixtures/probes/entities.jsonl and fixtures/facts/{counterfact,true_facts}.jsonl
line by line, and a few of the mining and parsing rules in fixtures/recipe/ on fixed strings.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parents[1] / "fixtures"
PROBES = FIXTURES / "probes" / "entities.jsonl"
COUNTERFACT = FIXTURES / "facts" / "counterfact.jsonl"
KNOWN = FIXTURES / "facts" / "known_facts.jsonl"
TRUE_FACTS = FIXTURES / "facts" / "true_facts.jsonl"

PROBE_FIELDS = {"prompt": str, "target": str, "count": int, "share": float, "target_tokens": int}
EDIT_FIELDS = {
    "prompt": str, "subject": str, "target_new": str, "ground_truth": str,
    "rephrase_prompt": list, "locality_prompt": list, "locality_ground_truth": list,
    "relation": str,
}


def _lines(path: Path) -> list[dict]:
    """Every line as a JSON object; fails naming the line that does not parse."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            pytest.fail(f"{path.name}:{number}: not JSON ({err})")
    return rows


def _check_fields(path: Path, rows: list[dict], fields: dict[str, type]) -> None:
    """Exactly the given keys, each of the given type (an int is not a float here)."""
    for number, row in enumerate(rows, start=1):
        assert set(row) == set(fields), f"{path.name}:{number}: keys {sorted(row)}"
        for key, kind in fields.items():
            ok = isinstance(row[key], kind) and not (kind is int and isinstance(row[key], bool))
            assert ok, f"{path.name}:{number}: {key} is {type(row[key]).__name__}"


def _load_recipe(name: str):
    """Import a script of fixtures/recipe/ (not a package) as module `recipe_<name>`."""
    qualified = f"recipe_{name}"
    if qualified not in sys.modules:
        path = FIXTURES / "recipe" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(qualified, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module  # dataclasses look their module up while being built
        spec.loader.exec_module(module)
    return sys.modules[qualified]


@pytest.fixture(scope="module")
def probes() -> list[dict]:
    return _lines(PROBES)


@pytest.fixture(scope="module")
def edits() -> list[dict]:
    return _lines(COUNTERFACT)


# ---------------------------------------------------------------------------------------------
# probes


def test_every_probe_line_has_the_documented_fields_and_types(probes):
    _check_fields(PROBES, probes, PROBE_FIELDS)


def test_probe_count_is_within_the_aimed_range(probes):
    assert 150 <= len(probes) <= 400


def test_probe_prompts_are_bare_and_targets_are_one_spaced_word(probes):
    for p in probes:
        assert p["prompt"] and p["prompt"] == p["prompt"].strip(), p
        assert p["target"].startswith(" ") and len(p["target"]) > 1, p
        assert p["target"][1:] == p["target"][1:].strip() and " " not in p["target"][1:], p
        assert p["target"][1].isupper(), p


def test_probe_counts_shares_and_token_counts_are_in_range(probes):
    for p in probes:
        assert p["count"] >= 5 and 0.9 <= p["share"] <= 1.0 and p["target_tokens"] >= 1, p


def test_probes_are_unique_and_sorted_by_count(probes):
    keys = [(p["prompt"], p["target"]) for p in probes]
    assert len(set(keys)) == len(keys)
    order = [(-p["count"], p["prompt"], p["target"]) for p in probes]
    assert order == sorted(order)


# ---------------------------------------------------------------------------------------------
# counterfactual edits


def test_every_edit_line_has_the_documented_fields_and_types(edits):
    _check_fields(COUNTERFACT, edits, EDIT_FIELDS)
    for row in edits:
        lists = (row["rephrase_prompt"], row["locality_prompt"], row["locality_ground_truth"])
        assert all(isinstance(x, str) for values in lists for x in values), row


def test_there_are_at_least_a_thousand_edits(edits):
    assert len(edits) >= 1000


def test_no_two_edits_share_a_prompt(edits):
    prompts = [row["prompt"] for row in edits]
    assert len(set(prompts)) == len(prompts)


def test_subject_appears_verbatim_in_the_prompt_and_every_rephrase(edits):
    for row in edits:
        assert row["subject"] and row["subject"] in row["prompt"], row
        assert all(row["subject"] in r for r in row["rephrase_prompt"]), row


def test_prompts_do_not_end_and_targets_do_not_start_with_a_space(edits):
    for row in edits:
        for prompt in [row["prompt"], *row["rephrase_prompt"], *row["locality_prompt"]]:
            assert prompt and prompt == prompt.rstrip(), row
        for target in [row["target_new"], row["ground_truth"], *row["locality_ground_truth"]]:
            assert target and target == target.strip(), row


def test_counterfactual_target_differs_from_the_ground_truth(edits):
    for row in edits:
        assert row["target_new"].casefold() != row["ground_truth"].casefold(), row


def test_counterfactual_target_is_a_true_value_of_another_subject(edits):
    values: dict[str, dict[str, str]] = {}
    for row in edits:
        values.setdefault(row["relation"], {})[row["subject"]] = row["ground_truth"]
    for row in edits:
        owners = [s for s, v in values[row["relation"]].items() if v == row["target_new"]]
        assert owners and row["subject"] not in owners, row


def test_locality_prompts_are_other_subjects_with_their_true_answers(edits):
    truth = {row["prompt"]: row["ground_truth"] for row in edits}
    for row in edits:
        assert row["locality_prompt"], row
        pairs = zip(row["locality_prompt"], row["locality_ground_truth"], strict=True)
        assert row["prompt"] not in row["locality_prompt"], row
        for prompt, answer in pairs:
            assert truth[prompt] == answer, (row["prompt"], prompt)
            assert answer.casefold() != row["target_new"].casefold(), row


def test_every_edit_is_a_known_fact_with_the_held_out_phrasings_as_rephrases(edits):
    known = {(k["prompt"], k["target_new"]) for k in _lines(KNOWN)}
    corpus = _load_recipe("build_fact_corpus")
    for row in edits:
        assert (row["prompt"], row["ground_truth"]) in known, row
        heldout = corpus.RELATIONS[row["relation"]].heldout
        assert row["rephrase_prompt"] == [corpus.prompt_of(t, row["subject"]) for t in heldout]
        for prompt, answer in zip(row["locality_prompt"], row["locality_ground_truth"],
                                  strict=True):
            assert (prompt, answer) in known, row


def test_true_facts_keep_their_source_package_and_version():
    rows = _lines(TRUE_FACTS)
    _check_fields(TRUE_FACTS, rows, {"relation": str, "subject": str, "answer": str,
                                     "source": str, "version": str})
    corpus = _load_recipe("build_fact_corpus")
    assert {r["relation"] for r in rows} == set(corpus.RELATIONS)
    assert len({(r["relation"], r["subject"]) for r in rows}) == len(rows)
    for r in rows:
        assert r["version"] and r["answer"] == r["answer"].strip(), r
        assert not corpus._words(r["answer"]) & corpus._words(r["subject"]), r


# ---------------------------------------------------------------------------------------------
# recipe rules on fixed strings


def test_probe_recipe_docstring_examples_hold():
    module = _load_recipe("build_probes")
    assert doctest.testmod(module).failed == 0


def test_held_out_phrasings_share_no_three_word_span_with_trained_ones():
    corpus = _load_recipe("build_fact_corpus")
    assert corpus.heldout_overlaps() == []
    assert corpus._spans("The capital of {s} is {a}.", "capital") == set()
    assert ("in", "which", "country") in corpus._spans("Q: In which country is {s}? A: {a}",
                                                       "capital")


def test_every_relation_has_six_trained_and_two_held_out_phrasings_ending_at_the_answer():
    corpus = _load_recipe("build_fact_corpus")
    for r in corpus.RELATIONS.values():
        assert len(r.trained) >= 6 and len(r.heldout) >= 2, r.name
        for t in r.trained + r.heldout:
            assert t.count("{s}") == 1 and t.count("{a}") == 1, t
            assert corpus.prompt_of(t, "X") == corpus.prompt_of(t, "X").rstrip()
            assert t.split("{a}")[1] in ("", "."), t


def test_currency_names_are_made_singular():
    corpus = _load_recipe("build_fact_corpus")
    assert corpus._singular("euros") == "euro"
    assert corpus._singular("Danish kroner") == "Danish krone"
    assert corpus._singular("kwanza") == "kwanza"
    assert corpus._singular("Swiss francs") == "Swiss franc"
