"""The shipped probe and fact files parse and keep their documented shape (no model needed).

Checks fixtures/probes/entities.jsonl and fixtures/facts/{counterfact,true_candidates}.jsonl
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
TRUE_CANDIDATES = FIXTURES / "facts" / "true_candidates.jsonl"

PROBE_FIELDS = {"prompt": str, "target": str, "count": int, "share": float, "target_tokens": int}
EDIT_FIELDS = {
    "prompt": str, "subject": str, "target_new": str, "ground_truth": str,
    "rephrase_prompt": list, "locality_prompt": list, "locality_ground_truth": list,
    "relation": str,
}
TRUE_FIELDS = {"prompt": str, "subject": str, "target_new": str, "relation": str}


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


def test_true_candidates_are_the_true_facts_of_the_edits_in_order(edits):
    rows = _lines(TRUE_CANDIDATES)
    _check_fields(TRUE_CANDIDATES, rows, TRUE_FIELDS)
    expected = [{"prompt": e["prompt"], "subject": e["subject"], "target_new": e["ground_truth"],
                 "relation": e["relation"]} for e in edits]
    assert rows == expected


# ---------------------------------------------------------------------------------------------
# recipe rules on fixed strings


def test_probe_recipe_docstring_examples_hold():
    module = _load_recipe("build_probes")
    assert doctest.testmod(module).failed == 0


def test_fact_parsers_keep_the_first_value_and_drop_asides():
    facts = _load_recipe("build_facts")
    assert facts.parse_capital("La Paz (seat of government); Sucre (constitutional)") == "La Paz"
    assert facts.parse_capital("no official capital; government offices in Yaren") is None
    assert facts.parse_nationality("Barbadian or Bajan (colloquial)") == "Barbadian"
    assert facts.parse_official_language("French (official) 100%, regional dialects") == "French"
    assert facts.parse_official_language("French (official), Creole (official)") is None
    assert facts.parse_anthem('"La Marseillaise" (The Song of Marseille)') == "La Marseillaise"
    assert facts.parse_highest_point("Mount Kenya 5,199 m") == "Mount Kenya"
    assert facts.parse_highest_point("unnamed location 5 m") is None
    assert facts.parse_independence_from("25 June 1975 (from Portugal)") == "Portugal"
    assert facts.parse_independence_from("30 July 1980 (from France and the UK)") is None


def test_capital_regions_are_refused_when_the_name_is_a_guess():
    facts = _load_recipe("build_facts")
    adjectives = frozenset({"Indian", "Indonesian"})
    known = ["Bosnia and Herzegovina", "Netherlands"]
    assert facts.region_of("the Indian state of Kerala", adjectives, known) == "Kerala"
    assert facts.region_of("Bosnia and Herzegovina", adjectives, known) == "Bosnia and Herzegovina"
    assert facts.region_of("the West Java province of Indonesia", adjectives, known) is None
    assert facts.region_of("Jammu and Kashmir", adjectives, known) is None
