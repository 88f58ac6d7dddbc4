"""Fact files: both record layouts read, and every kind of bad line reported as FILE:LINE: field."""

import json
from pathlib import Path

import pytest

from engram_edit.edit.facts import Fact, read_facts
from engram_edit.errors import BadInputError

FIXTURE = Path(__file__).parent.parent / "fixtures" / "facts" / "counterfact.jsonl"

GOOD = {"prompt": "Diana, Princess of", "subject": "Diana", "target_new": "Wales"}


def write(tmp_path: Path, lines: list, name: str = "facts.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                            for x in lines), encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(BadInputError) as err:
        read_facts(path)
    return err.value.problems


def test_an_easyedit_line_becomes_a_fact_with_lists_for_strings(tmp_path):
    path = write(tmp_path, [{**GOOD, "ground_truth": "Hearts", "rephrase_prompt": "Diana was",
                             "locality_prompt": "Charles, Prince of",
                             "locality_ground_truth": "Wales", "portability": {"x": 1}}])
    [fact] = read_facts(path)
    assert fact == Fact("Diana, Princess of", "Diana", "Wales", "Hearts", ["Diana was"],
                        ["Charles, Prince of"], ["Wales"], line=1)


def test_portability_prompts_pair_with_their_answers_and_are_kept_in_the_record(tmp_path):
    path = write(tmp_path, [{**GOOD, "portability_prompt": ["Diana's title named"],
                             "portability_ground_truth": "Wales"}])
    [fact] = read_facts(path)
    assert fact.portability_prompts == ["Diana's title named"]
    assert fact.portability_answers == ["Wales"]
    assert fact.to_dict()["portability_ground_truth"] == ["Wales"]


def test_a_counterfact_record_fills_its_template_and_pairs_neighbours(tmp_path):
    rec = {"case_id": 7, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French"}},
        "paraphrase_prompts": ["Danielle Darrieux spoke"],
        "neighborhood_prompts": ["The native language of Montesquieu is",
                                 {"prompt": "Brel sang in", "answer": "Dutch"}]}
    [fact] = read_facts(write(tmp_path, [rec]))
    assert fact.prompt == "The mother tongue of Danielle Darrieux is"
    assert (fact.target_new, fact.ground_truth) == ("English", "French")
    assert fact.rephrase_prompts == ["Danielle Darrieux spoke"]
    assert fact.locality_prompts == ["The native language of Montesquieu is", "Brel sang in"]
    assert fact.locality_answers == ["French", "Dutch"]


def test_the_target_is_scored_with_a_space_only_at_a_bare_seam():
    assert Fact("Princess of", "Princess", "Wales").target == " Wales"
    assert Fact("Princess of ", "Princess", "Wales").target == "Wales"
    assert Fact("Princess of", "Princess", " Wales").target == " Wales"


def test_blank_lines_are_skipped_and_a_repeated_fact_is_kept(tmp_path):
    facts = read_facts(write(tmp_path, [GOOD, "", "   ", GOOD]))
    assert [f.line for f in facts] == [1, 4]


def test_the_fixture_counterfact_file_reads_whole():
    facts = read_facts(FIXTURE)
    assert len(facts) == len(FIXTURE.read_text().splitlines()) >= 1000
    assert all(len(f.locality_prompts) == len(f.locality_answers) == 3 for f in facts)


@pytest.mark.parametrize("line, field, what", [
    ("{not json", "line", "not JSON"),
    ("[1, 2]", "line", "not a JSON object (got a list)"),
    ({"subject": "Diana", "target_new": "Wales"}, "prompt", "missing"),
    ({**GOOD, "prompt": 5}, "prompt", "must be a string, got a number"),
    ({**GOOD, "target_new": ""}, "target_new", "empty or whitespace only"),
    ({**GOOD, "target_new": "  \t"}, "target_new", "empty or whitespace only"),
    ({**GOOD, "subject": "Charles"}, "subject", "does not occur in the prompt"),
    ({**GOOD, "rephrase_prompt": ["ok", 3]}, "rephrase_prompt", "item 1"),
    ({**GOOD, "locality_prompt": ["a", "b"], "locality_ground_truth": ["x"]},
     "locality_ground_truth", "1 answers for 2 locality prompts"),
    ({**GOOD, "portability_prompt": "a", "portability_ground_truth": ["x", "y"]},
     "portability_ground_truth", "2 answers for 1 portability prompts"),
    ({"requested_rewrite": {"prompt": "The capital of France is", "subject": "France",
                            "target_new": {"str": "Lima"}}},
     "requested_rewrite.prompt", "has no '{}'"),
    ({"requested_rewrite": {"prompt": "{} is in", "subject": "Paris",
                            "target_new": {"str": " "}}},
     "requested_rewrite.target_new.str", "empty or whitespace only"),
])
def test_each_bad_line_is_one_problem_naming_file_line_and_field(tmp_path, line, field, what):
    path = write(tmp_path, [GOOD, line])
    [problem] = problems(path)
    assert problem.startswith(f"{path}:2: {field}: ")
    assert what in problem


def test_two_lines_asking_different_targets_for_one_prompt_are_refused(tmp_path):
    path = write(tmp_path, [GOOD, {**GOOD, "target_new": "Monaco"}])
    [problem] = problems(path)
    assert problem.startswith(f"{path}:2: target_new: ")
    assert "line 1 asks 'Wales'" in problem


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n{\"prompt\": \"\xff\"}\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:2: line: bytes are not UTF-8")


def test_every_problem_of_every_line_is_reported_at_once(tmp_path):
    path = write(tmp_path, ["nope", {"prompt": "x"}, GOOD, {**GOOD, "subject": "Q"}])
    found = problems(path)
    assert [p.split(": ")[0] for p in found] == [f"{path}:1", f"{path}:2", f"{path}:2",
                                                 f"{path}:4"]


@pytest.mark.parametrize("make, what", [
    (lambda p: p, "not found"),
    (lambda p: (p.mkdir(), p)[1], "is a directory"),
    (lambda p: (p.write_text("\n\n"), p)[1], "no facts"),
])
def test_a_missing_unreadable_or_empty_file_is_one_problem_line(tmp_path, make, what):
    path = make(tmp_path / "facts.jsonl")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:0: file: ") and what in problem
