"""Which table rows a fact touches: the n-grams of its prompt that hold the subject, in every
Engram layer, and (``--rows final|both``, or ``auto`` when specific) the final position's;
``auto`` leaves out the n-grams that only spell the subject and, with a corpus n-gram index,
the heads whose row is crowded.

Tokenizing facts and hashing them is here; optimizing the rows is distill.py's, writing them
overwrite.py's and journal.py's (docs/engram.md section 4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np

from engram_edit.edit.facts import Fact
from engram_edit.errors import BadInputError
from engram_edit.hashing import NgramHasher
from engram_edit.tokenizer import EngramTokenizer

# How often (in the corpus n-gram index) a final-position n-gram may occur and still count as
# specific to one fact under ``auto``; template n-grams such as "of the" occur far more often.
RARE_NGRAM_COUNT = 20
# Under ``auto`` with slot loads, a head's row is crowded when the other n-grams reading it
# occur in the corpus more than this many times as often as on the median of the n-gram's
# other heads (in the same layer); the rule keeps at least half of an n-gram's heads.
CROWDED_RATIO = 3.0


class RowChoice(str, Enum):
    """Which n-grams' rows an edit may change.

    subject: every n-gram that contains a subject token, at the positions that predict the
    target. final: every n-gram ending at those positions. both: the union. auto: subject less
    the subject's own spelling (``spells_subject``), plus the n-grams of the prompt's last
    position that are rare in the corpus n-gram index, less each n-gram's crowded heads
    (``CROWDED_RATIO``; both only when an index is given).
    """

    AUTO = "auto"
    SUBJECT = "subject"
    FINAL = "final"
    BOTH = "both"


@dataclass
class FactTokens:
    """A fact as token ids: the teacher-forced sequence is ``prompt + target``."""

    prompt: list[int]
    target: list[int]
    subject: list[int]  # positions in ``prompt`` of the tokens that overlap the subject
    truth: list[int] | None = None  # the ground truth's ids, when the fact has one

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.target

    @property
    def predicting(self) -> range:
        """Positions of ``sequence`` whose next-token prediction is a target token."""
        return range(len(self.prompt) - 1, len(self.prompt) + len(self.target) - 1)


def tokenize_fact(fact: Fact, tokenizer: EngramTokenizer) -> FactTokens:
    """Token ids of the prompt and the scored target, and where the subject sits.

    Raises:
        BadInputError: the prompt or target encodes to no tokens, naming the fact's line.
    """
    enc = tokenizer.tokenizer.encode(fact.prompt, add_special_tokens=False)
    target = tokenizer.encode(fact.target)
    if not enc.ids or not target:
        raise BadInputError(f"line {fact.line}: prompt or target_new encodes to no tokens")
    start, end = fact.subject_span()
    subject = [i for i, (a, b) in enumerate(enc.offsets) if a < end and b > start]
    truth = None if fact.truth is None else tokenizer.encode(fact.truth) or None
    return FactTokens(list(enc.ids), target, subject, truth)


NgramCount = Callable[[tuple[int, ...]], int]
"""Corpus count of an n-gram given as compressed ids (from the corpus n-gram index)."""

SlotOccurrences = Mapping[int, np.ndarray]
"""Per Engram layer, the corpus occurrences of the indexed n-grams reading each global row
(``NgramIndex.slot_loads(layer)[1]``)."""


@dataclass
class FactRows:
    """Rows one fact touches, per Engram layer: sorted unique int64 row ids."""

    rows: dict[int, np.ndarray]
    left_out: int = 0  # crowded head rows that ``auto`` left out (before deduplication)

    @property
    def count(self) -> int:
        return sum(len(r) for r in self.rows.values())


def _ngrams(tokens: FactTokens, hasher: NgramHasher, choice: RowChoice, compressed: np.ndarray,
            ngram_count: NgramCount | None) -> list[tuple[int, int]]:
    """(position, order) of every chosen n-gram among those the target's prediction reads."""
    subject = set(tokens.subject)
    predicting = set(tokens.predicting)
    prompt_end = len(tokens.prompt) - 1
    chosen = []
    for pos in range(tokens.predicting[-1] + 1):
        for order in range(2, hasher.max_ngram + 1):
            span = range(pos - order + 1, pos + 1)
            has_subject = any(i in subject for i in span)
            final = pos in predicting
            if choice is RowChoice.SUBJECT:
                keep = has_subject
            elif choice is RowChoice.FINAL:
                keep = final
            elif choice is RowChoice.BOTH:
                keep = has_subject or final
            else:  # a final n-gram that holds target tokens is read by every prompt
                # answered with that target, so it is never specific
                keep = has_subject and not spells_subject(span, tokens.subject)
                if not keep and pos == prompt_end and ngram_count is not None:
                    keep = ngram_count(_ngram_ids(compressed, pos, order,
                                                  hasher.pad_id)) < RARE_NGRAM_COUNT
            if keep:
                chosen.append((pos, order))
    return chosen


def spells_subject(span: range, subject: list[int]) -> bool:
    """Whether the n-gram over prompt positions ``span`` is part of the subject's own spelling:
    it ends inside the subject, before its last token, and reaches back no further than the
    subject's first token or the start of the text. Its row predicts the subject's next token
    ("Burkina" -> " Faso"), which a fact about the subject is not about, and every text naming
    the subject reads it; n-grams that reach into the words before the subject, or end at its
    last token, still carry the edit."""
    inside = set(subject)
    return (bool(subject) and span[-1] in inside and span[-1] != max(subject)
            and all(i in inside or i < 0 for i in span))


def crowded_heads(others: np.ndarray) -> np.ndarray:
    """Which heads to leave out of an n-gram's rows in one layer, given the corpus occurrences
    of the other n-grams on each head's row (``others [..., heads]``, any leading shape): bool,
    true where that is above ``CROWDED_RATIO`` x the median of the other heads' (x 1 when that
    is below 1).

    At most half the heads are: were more, the least crowded of them would have a median of
    the others at least as large as its own load."""
    heads = others.shape[-1]
    if heads < 2:
        return np.zeros(others.shape, dtype=bool)
    rest = np.array([[k for k in range(heads) if k != j] for j in range(heads)])
    bar = CROWDED_RATIO * np.maximum(np.median(others[..., rest], axis=-1), 1.0)
    return others > bar


def _ngram_ids(compressed: np.ndarray, pos: int, order: int, pad_id: int) -> tuple[int, ...]:
    return tuple(int(compressed[i]) if i >= 0 else pad_id for i in range(pos - order + 1, pos + 1))


def locate_rows(tokens: FactTokens, tokenizer: EngramTokenizer, hasher: NgramHasher,
                choice: RowChoice = RowChoice.AUTO,
                ngram_count: NgramCount | None = None,
                slot_occurrences: SlotOccurrences | None = None) -> FactRows:
    """The rows of every head of every chosen n-gram, in every Engram layer.

    Candidates are the n-grams the target's prediction reads: those ending anywhere in the
    prompt or in the target but its last token (teacher forcing reads those too). "Final"
    n-grams end at a position that predicts a target token.

    Args:
        tokens (`FactTokens`): from ``tokenize_fact``.
        tokenizer (`EngramTokenizer`): its compression table maps raw ids for hashing.
        hasher (`NgramHasher`): the model's hashing.
        choice (`RowChoice`, defaults to auto): which n-grams.
        ngram_count (`NgramCount`, optional): corpus counts, used by ``auto`` to keep rare
            final-position n-grams; without it ``auto`` is ``subject``.
        slot_occurrences (`SlotOccurrences`, optional): with ``ngram_count``, ``auto`` leaves
            out each n-gram's crowded heads (``crowded_heads``).

    Returns:
        `FactRows`: per layer, sorted unique row ids (empty arrays when nothing is chosen),
        and how many crowded head rows were left out.

    Example:
        >>> t = tokenize_fact(Fact("Diana, Princess of", "Diana", "Wales"), tok)  # doctest: +SKIP
        >>> locate_rows(t, tok, files.hasher).count  # doctest: +SKIP
        48
    """
    seq = np.asarray(tokens.sequence, dtype=np.int64)
    compressed = tokenizer.compress(seq)
    rows = hasher.rows(compressed[None, :])  # layer -> [1, T, C]
    choice = RowChoice(choice)
    chosen = _ngrams(tokens, hasher, choice, compressed, ngram_count)
    spare = (choice is RowChoice.AUTO and ngram_count is not None
             and slot_occurrences is not None)
    n_heads = hasher.n_heads
    columns = np.array([[hasher.column(order, h) for h in range(n_heads)] for _, order in chosen],
                       dtype=np.int64).reshape(len(chosen), n_heads)
    positions = np.array([pos for pos, _ in chosen], dtype=np.int64)[:, None]
    own = (np.array([ngram_count(_ngram_ids(compressed, pos, order, hasher.pad_id))
                     for pos, order in chosen], dtype=np.int64)[:, None] if spare else None)
    out, left_out = {}, 0
    for lid in hasher.layer_ids:
        heads = rows[lid][0][positions, columns]  # [chosen, heads]
        keep = np.ones(heads.shape, dtype=bool)
        if spare:
            keep = ~crowded_heads(np.asarray(slot_occurrences[lid][heads], np.int64) - own)
            left_out += int((~keep).sum())
        out[lid] = np.unique(heads[keep].astype(np.int64))
    return FactRows(out, left_out)


def group_facts(fact_rows: list[FactRows], max_group: int) -> list[list[int]]:
    """Fact indices packed into batches of at most ``max_group``, keeping facts that share a
    row in one batch where their component fits (those are solved jointly). A larger component
    is cut in file order; distill.py then keeps the earlier batches' facts as constraints."""
    parent = list(range(len(fact_rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[int, int], int] = {}
    for i, fr in enumerate(fact_rows):
        for lid, rows in fr.rows.items():
            for r in rows.tolist():
                j = owner.setdefault((lid, r), i)
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    components: dict[int, list[int]] = {}
    for i in range(len(fact_rows)):
        components.setdefault(find(i), []).append(i)
    batches: list[list[int]] = []
    current: list[int] = []
    for comp in sorted(components.values(), key=lambda c: c[0]):
        if len(comp) > max_group:  # too big to solve at once: split, in file order
            if current:
                batches.append(current)
                current = []
            batches += [comp[i:i + max_group] for i in range(0, len(comp), max_group)]
            continue
        if current and len(current) + len(comp) > max_group:
            batches.append(current)
            current = []
        current = current + comp
    if current:
        batches.append(current)
    return batches
