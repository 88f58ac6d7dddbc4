"""Fact files: JSONL of requested edits, read and validated completely before anything runs.

Owns the Fact value and the two record layouts (EasyEdit fields, CounterFact records); what a
fact does to the model is locate.py's and distill.py's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engram_edit.errors import BadInputError


def scored_target(prompt: str, target: str) -> str:
    """The text scored after ``prompt``: a space is put before the target when neither side
    has whitespace at the seam (so "Princess of" + "Wales" scores " Wales")."""
    if prompt and not prompt[-1].isspace() and target and not target[0].isspace():
        return " " + target
    return target


@dataclass
class Fact:
    """One requested edit: after it, ``prompt`` should continue with ``target_new``.

    ``rephrase_prompts`` ask the same thing in other words (paraphrase metric);
    ``locality_prompts`` with ``locality_answers`` are neighbours that must keep their answers;
    ``portability_prompts`` with ``portability_answers`` are questions whose answers should
    follow from the new fact (EasyEdit's portability).
    ``line`` is the 1-based line of the fact file it came from (0 when built in code).
    """

    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)
    locality_prompts: list[str] = field(default_factory=list)
    locality_answers: list[str] = field(default_factory=list)
    portability_prompts: list[str] = field(default_factory=list)
    portability_answers: list[str] = field(default_factory=list)
    line: int = 0

    @property
    def target(self) -> str:
        """The text scored after ``prompt`` (a space added at a bare seam, ``scored_target``)."""
        return scored_target(self.prompt, self.target_new)

    @property
    def truth(self) -> str | None:
        """``ground_truth`` as scored after ``prompt``, or None."""
        return None if self.ground_truth is None else scored_target(self.prompt,
                                                                   self.ground_truth)

    def subject_span(self) -> tuple[int, int]:
        """Character span of the subject in the prompt (its last occurrence)."""
        start = self.prompt.rfind(self.subject)
        assert start >= 0, "subject must occur in the prompt (checked by read_facts)"
        return start, start + len(self.subject)

    def to_dict(self) -> dict[str, Any]:
        """The EasyEdit fields of this fact (what a patch's metadata records)."""
        d = asdict(self)
        d.pop("line")
        return {"prompt": d["prompt"], "subject": d["subject"], "target_new": d["target_new"],
                "ground_truth": d["ground_truth"], "rephrase_prompt": d["rephrase_prompts"],
                "locality_prompt": d["locality_prompts"],
                "locality_ground_truth": d["locality_answers"],
                "portability_prompt": d["portability_prompts"],
                "portability_ground_truth": d["portability_answers"]}


class _Line:
    """Problems of one line, each ``FILE:LINE: field: what is wrong``."""

    def __init__(self, path: Path, number: int, problems: list[str]) -> None:
        self.path, self.number, self.problems = path, number, problems

    def bad(self, name: str, what: str) -> None:
        self.problems.append(f"{self.path}:{self.number}: {name}: {what}")

    def string(self, rec: dict[str, Any], name: str, required: bool = True,
               nonblank: bool = False) -> str | None:
        value = rec.get(name)
        if value is None:
            if required:
                self.bad(name, "missing")
            return None
        if not isinstance(value, str):
            self.bad(name, f"must be a string, got {_kind(value)}")
            return None
        if nonblank and not value.strip():
            self.bad(name, "empty or whitespace only")
            return None
        return value

    def strings(self, rec: dict[str, Any], name: str) -> list[str] | None:
        """A string or a list of strings (absent or null: empty list); None when invalid."""
        value = rec.get(name)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            self.bad(name, f"must be a string or a list of strings, got {_kind(value)}")
            return None
        bad = [i for i, x in enumerate(items) if not isinstance(x, str) or not x.strip()]
        if bad:
            self.bad(name, f"item {bad[0]} is not a non-empty string")
            return None
        return list(items)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number",
            float: "a number", str: "a string"}.get(type(value), type(value).__name__)


def _easyedit(rec: dict[str, Any], at: _Line) -> Fact | None:
    before = len(at.problems)
    prompt = at.string(rec, "prompt", nonblank=True)
    subject = at.string(rec, "subject", nonblank=True)
    target = at.string(rec, "target_new", nonblank=True)
    truth = at.string(rec, "ground_truth", required=False, nonblank=True)
    rephrase = at.strings(rec, "rephrase_prompt")
    loc = at.strings(rec, "locality_prompt")
    answers = at.strings(rec, "locality_ground_truth")
    if prompt is not None and subject is not None and subject not in prompt:
        at.bad("subject", f"{subject!r} does not occur in the prompt {prompt!r}")
    port = at.strings(rec, "portability_prompt")
    port_answers = at.strings(rec, "portability_ground_truth")
    for kind, prompts, replies in (("locality", loc, answers), ("portability", port,
                                                                port_answers)):
        if prompts is not None and replies is not None and len(prompts) != len(replies):
            at.bad(f"{kind}_ground_truth", f"{len(replies)} answers for {len(prompts)} "
                                           f"{kind} prompts (they must pair up)")
    if len(at.problems) > before:
        return None
    return Fact(prompt, subject, target, truth, rephrase, loc, answers, port, port_answers,
                at.number)


def _counterfact(rec: dict[str, Any], at: _Line) -> Fact | None:
    """A CounterFact record: ``requested_rewrite`` holds a ``{}`` prompt filled by the subject."""
    before = len(at.problems)
    rw = rec["requested_rewrite"]
    if not isinstance(rw, dict):
        at.bad("requested_rewrite", f"must be an object, got {_kind(rw)}")
        return None
    template = at.string(rw, "prompt", nonblank=True)
    subject = at.string(rw, "subject", nonblank=True)
    targets = {}
    for name in ("target_new", "target_true"):
        value = rw.get(name)
        inner = value.get("str") if isinstance(value, dict) else None
        if value is None and name == "target_true":
            targets[name] = None
        elif not isinstance(inner, str):
            at.bad(f"requested_rewrite.{name}.str", "missing or not a string")
        elif not inner.strip():
            at.bad(f"requested_rewrite.{name}.str", "empty or whitespace only")
        else:
            targets[name] = inner
    if template is not None and "{}" not in template:
        at.bad("requested_rewrite.prompt", f"{template!r} has no '{{}}' for the subject")
    paraphrases = at.strings(rec, "paraphrase_prompts")
    neighbours = rec.get("neighborhood_prompts") or []
    loc, answers = [], []
    if not isinstance(neighbours, list):
        at.bad("neighborhood_prompts", f"must be a list, got {_kind(neighbours)}")
    else:
        for i, n in enumerate(neighbours):
            if isinstance(n, str) and n.strip() and targets.get("target_true"):
                loc.append(n)
                answers.append(targets["target_true"])
            elif (isinstance(n, dict) and isinstance(n.get("prompt"), str) and n["prompt"].strip()
                  and isinstance(n.get("answer"), str) and n["answer"].strip()):
                loc.append(n["prompt"])
                answers.append(n["answer"])
            else:
                at.bad("neighborhood_prompts", f"item {i} must be a prompt string (with "
                       f"target_true given) or an object with non-empty 'prompt' and 'answer'")
                break
    if len(at.problems) > before:
        return None
    prompt = template.replace("{}", subject)
    return Fact(prompt, subject, targets["target_new"], targets.get("target_true"),
                paraphrases, loc, answers, line=at.number)


def parse_fact(rec: Any, path: Path, number: int, problems: list[str]) -> Fact | None:
    """One decoded JSON line as a Fact, appending its problems to ``problems``."""
    at = _Line(path, number, problems)
    if not isinstance(rec, dict):
        at.bad("line", f"not a JSON object (got {_kind(rec)})")
        return None
    if "requested_rewrite" in rec:
        return _counterfact(rec, at)
    return _easyedit(rec, at)


def read_facts(path: str | Path) -> list[Fact]:
    """Read and validate a fact file; every problem of every line is reported at once.

    Each non-blank line is one JSON object, either with EasyEdit fields (``prompt``,
    ``subject``, ``target_new``, optional ``ground_truth``, ``rephrase_prompt`` string or list,
    ``locality_prompt`` and ``locality_ground_truth`` strings or lists of equal length, and
    likewise ``portability_prompt`` and ``portability_ground_truth``) or a
    CounterFact record (``requested_rewrite`` with a ``{}`` prompt, ``subject``,
    ``target_new.str``, ``target_true.str``; ``paraphrase_prompts``; ``neighborhood_prompts``
    as strings answered by ``target_true`` or ``{prompt, answer}`` objects). Unknown fields are
    ignored.

    Args:
        path (`str | Path`): the JSONL file.

    Returns:
        `list[Fact]`: in file order.

    Raises:
        BadInputError: one line per problem, ``FILE:LINE: field: what is wrong``: a missing or
            unreadable file, bytes that are not UTF-8, not JSON, not an object, a missing or
            non-string field, an empty target, a subject not in its prompt, a CounterFact
            prompt without ``{}``, locality or portability lists of different lengths, two
            lines asking different targets for one prompt, or a file with no facts.

    Example:
        >>> facts = read_facts("fixtures/facts/counterfact.jsonl")  # doctest: +SKIP
        >>> facts[0].prompt, facts[0].target
        ('The capital of Afghanistan is', ' Nassau')
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{path}:0: file: not found") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}:0: file: is a directory, not a fact file") from None
    except OSError as err:
        raise BadInputError(f"{path}:0: file: cannot read ({err.strerror})") from None
    problems: list[str] = []
    facts: list[Fact] = []
    first_line: dict[str, Fact] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"{path}:{number}: line: bytes are not UTF-8 (byte "
                            f"0x{raw[err.start]:02x} at column {err.start + 1})")
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{number}: line: not JSON ({err.msg} at column "
                            f"{err.colno})")
            continue
        fact = parse_fact(rec, path, number, problems)
        if fact is None:
            continue
        seen = first_line.setdefault(fact.prompt, fact)
        if seen is not fact and seen.target_new != fact.target_new:
            problems.append(f"{path}:{number}: target_new: {fact.target_new!r}, but line "
                            f"{seen.line} asks {seen.target_new!r} for the same prompt")
            continue
        facts.append(fact)
    if not facts and not problems:
        problems.append(f"{path}:0: file: no facts (the file is empty)")
    if problems:
        raise BadInputError(problems)
    return facts
