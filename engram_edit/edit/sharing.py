"""Which other n-grams the rows of an edit serve: per fact, the rows it touches,
the indexed n-grams that read them besides the fact's own, and corpus text that ends with those
n-grams, for distill's locality term. Reading the index is index.py's, choosing rows locate.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engram_edit.edit.locate import FactRows, FactTokens
from engram_edit.index import NgramIndex, RowMembers

REPORTED_SHARERS = 10  # sharers listed per fact, the most frequent first
CONTEXT_TOKENS = 16  # tokens of corpus text kept before a sharer in a locality prompt


@dataclass
class RowSharer:
    """An indexed n-gram that reads some of the rows a fact touches."""

    ids: tuple[int, ...]  # compressed ids, oldest first
    text: str  # as ``NgramIndex.ngram_text`` spells it
    count: int  # occurrences in the indexed corpus
    rows: int  # how many of the fact's touched rows it reads

    def to_dict(self) -> dict[str, Any]:
        return {"ngram": self.text, "count": self.count, "rows": self.rows}


@dataclass
class FactSharing:
    """The rows one fact touches and the other n-grams they serve."""

    rows: dict[int, int]  # Engram layer -> rows touched
    left_out: int  # crowded head rows that ``--rows auto`` left out
    slot_ngrams: float  # mean distinct indexed n-grams per touched row, the fact's own included
    slot_occurrences: float  # mean corpus occurrences of those n-grams per touched row
    sharers: list[RowSharer]  # the most frequent first, at most REPORTED_SHARERS
    more_sharers: int  # distinct other n-grams on the rows beyond those listed
    contexts: int = 0  # corpus texts ending with a sharer added to the fact's locality prompts

    def to_dict(self) -> dict[str, Any]:
        return {"rows": {str(k): v for k, v in self.rows.items()}, "left_out": self.left_out,
                "slot_ngrams": self.slot_ngrams, "slot_occurrences": self.slot_occurrences,
                "sharers": [s.to_dict() for s in self.sharers],
                "more_sharers": self.more_sharers, "contexts": self.contexts}


def own_ngrams(index: NgramIndex, tokens: FactTokens) -> set[tuple[int, ...]]:
    """Every n-gram of the fact's prompt and target that the model hashes (compressed ids)."""
    h = index.hasher
    ids = index.tokenizer.compress(tokens.sequence).tolist()
    padded = [h.pad_id] * (h.max_ngram - 1) + ids
    return {tuple(padded[end - n + 1:end + 1]) for end in range(h.max_ngram - 1, len(padded))
            for n in range(2, h.max_ngram + 1)}


def facts_sharing(index: NgramIndex, tokens: Sequence[FactTokens],
                  fact_rows: Sequence[FactRows]) -> list[FactSharing]:
    """Per fact, its touched rows and the indexed n-grams other than its own that read them.

    Args:
        index (`NgramIndex`): the corpus n-gram index opened against the edited model.
        tokens (`Sequence[FactTokens]`): the facts, from ``locate.tokenize_fact``.
        fact_rows (`Sequence[FactRows]`): their rows, from ``locate.locate_rows``.

    Returns:
        `list[FactSharing]`: one per fact; its sharers are those ``NgramIndex.sharers`` gives
        for each touched row with the fact's own n-grams excluded, merged, the most frequent
        first (ties: the most rows, then the ids).

    Example:
        >>> facts_sharing(index, tokens, rows)[0].sharers[0]  # doctest: +SKIP
        RowSharer(ids=(12, 40), text='of the', count=5120, rows=1)
    """
    members = {lid: index.row_members(lid, np.concatenate(
        [fr.rows.get(lid, np.zeros(0, np.int64)) for fr in fact_rows] or [np.zeros(0, np.int64)]))
        for lid in index.hasher.layer_ids}
    loads = {}  # layer -> per row of ``members``: (n-grams, their corpus occurrences)
    for lid, m in members.items():
        total = np.concatenate([[0], np.cumsum(m.count)])
        loads[lid] = (np.diff(m.starts), total[m.starts[1:]] - total[m.starts[:-1]])
    out = []
    for t, fr in zip(tokens, fact_rows, strict=True):
        entries, per_row = [], []
        for lid, rows in fr.rows.items():
            m = members[lid]
            at = np.searchsorted(m.rows, rows)
            per_row += list(zip(loads[lid][0][at].tolist(), loads[lid][1][at].tolist(),
                                strict=True))
            entries.append((m, np.concatenate([np.arange(m.starts[i], m.starts[i + 1])
                                               for i in at.tolist()] or [np.zeros(0, int)])))
        sharers, more = _ranked_sharers(index, entries, own_ngrams(index, t))
        mean = np.mean(per_row, axis=0).tolist() if per_row else [0.0, 0.0]
        out.append(FactSharing({lid: len(r) for lid, r in fr.rows.items()}, fr.left_out,
                               mean[0], mean[1], sharers, more))
    return out


def _ranked_sharers(index: NgramIndex, entries: list[tuple[RowMembers, np.ndarray]],
                    own: set[tuple[int, ...]]) -> tuple[list[RowSharer], int]:
    """The top ``REPORTED_SHARERS`` of the n-grams on a fact's rows that are not its own
    (``entries``: per layer, the row members and the entries on the fact's rows), and how many
    more there are."""
    ids = np.concatenate([m.ids[e] for m, e in entries])
    count = np.concatenate([m.count[e] for m, e in entries])
    mine = np.full((len(own), ids.shape[1]), -1, dtype=np.int64)
    for i, gram in enumerate(own):
        mine[i, :len(gram)] = gram
    keep = ~np.isin(_as_keys(ids), _as_keys(mine))
    ids, count = ids[keep], count[keep]
    _, first, rows = np.unique(_as_keys(ids), return_index=True, return_counts=True)
    unique = ids[first]
    count = count[first]
    ranked = np.lexsort((-rows, -count))
    cut = min(REPORTED_SHARERS, len(ranked))
    while 0 < cut < len(ranked) and (count[ranked[cut]], rows[ranked[cut]]) == (
            count[ranked[cut - 1]], rows[ranked[cut - 1]]):
        cut += 1  # ties at the edge are settled by the ids below
    top = sorted((-int(count[i]), -int(rows[i]), tuple(g for g in unique[i].tolist() if g >= 0))
                 for i in ranked[:cut].tolist())[:REPORTED_SHARERS]
    sharers = [RowSharer(g, index.ngram_text(g), -c, -r) for c, r, g in top]
    return sharers, max(len(unique) - REPORTED_SHARERS, 0)


def _as_keys(ids: np.ndarray) -> np.ndarray:
    """Each row of ``ids [n, width]`` as one opaque value, equal exactly when the rows are."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    return ids.view(np.dtype((np.void, 8 * ids.shape[1]))).reshape(-1)


def corpus_of(index: NgramIndex) -> list[Path]:
    """The index's own corpus files that are still where it was built from (paths relative to
    the working directory stay relative); empty when none is."""
    return [Path(s.path) for s in index.info.sources if Path(s.path).is_file()]


def sharer_prompts(index: NgramIndex, sharing: Sequence[FactSharing], per_fact: int,
                   corpus: Sequence[str | Path]) -> list[list[list[int]]]:
    """Per fact, up to ``per_fact`` locality prompts: corpus text ending with one of its most
    frequent sharers each, as raw token ids, so the prompt's last position reads the sharer's
    rows. Sets each ``FactSharing.contexts``.

    The corpus is streamed once for all facts (``NgramIndex.sample_contexts``). A text whose
    re-encoding does not end with its sharer (the decoded cut can tokenize differently) is
    dropped.

    Args:
        index (`NgramIndex`): the index the sharers came from.
        sharing (`Sequence[FactSharing]`): from ``facts_sharing``.
        per_fact (`int`): sharers used per fact (at most ``REPORTED_SHARERS``).
        corpus (`Sequence[str | Path]`): text files in the formats of ``index.build_index``.

    Returns:
        `list[list[list[int]]]`: per fact, token id prompts.

    Raises:
        BadInputError: a corpus file is missing or unreadable.
    """
    wanted = {s.ids for fs in sharing for s in fs.sharers[:per_fact]}
    texts = index.sample_contexts(wanted, corpus, per_ngram=1, context_tokens=CONTEXT_TOKENS)
    tok = index.tokenizer
    prompts: dict[tuple[int, ...], list[int]] = {}
    for ids, found in texts.items():
        for text in found:
            raw = tok.encode(text)
            if tuple(tok.compress(raw)[-len(ids):].tolist()) == ids:
                prompts[ids] = raw
    out = []
    for fs in sharing:
        mine = [prompts[s.ids] for s in fs.sharers[:per_fact] if s.ids in prompts]
        fs.contexts = len(mine)
        out.append(mine)
    return out
