"""overwrite through the logit lens: the closed form of ``patch --method overwrite`` on a
DeepSeek-V4.1 directory, where no engram-edit model can be built. numpy, by offset, no model.

Every row r that locate.py picks for fact i is read as ``rows`` shows it, alone in its column c
(layouts/lens.py): ``v = W_c r``, ``h = norm * v / rms(v)``, ``logits = H h``. The fact asks the
row for the lens margin ``f = logit(t) - logit(g) = log P(t) - log P(g)``, t and g the first
tokens of target_new and ground_truth; without a ground truth (or one that starts with the
target's token), g's unembedding is the mean of the head's rows (the target's logit over the
average logit). With ``a = norm * (H[t] - H[g])``,
``f = a . v / rms(v)`` and its gradient with respect to r is
``W_c^T (a - (a . v) v / (hidden * rms(v)^2)) / rms(v)``. As in overwrite.py, the minimum-norm
change that moves every (fact, row) pair to the wanted margin, linearized, is
``delta = G^T alpha`` with ``(G G^T + eps diag) alpha = margin - f``: pairs on one row (facts
that share it) are solved jointly, a pair already past the margin asks for nothing, a few
re-linearized steps follow the RMSNorm, and every edited row's norm stays within
``norm_bound`` x the layer's 99th-percentile row norm.

The lens leaves out what only the whole network has: attention and the later layers, the gate
(taken as 1), the other rows of the position. So efficacy, paraphrase and locality cannot be
measured here; the report gives the lens margins before and after instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np

from engram_edit.checkpoint import ModelFiles
from engram_edit.edit.facts import Fact
from engram_edit.edit.locate import NgramCount, RowChoice, locate_rows, tokenize_fact
from engram_edit.edit.patch import Patch, tool_version
from engram_edit.edit.rows import rows_patch
from engram_edit.layouts import lens


@dataclass
class LensSettings:
    margin: float = 3.0  # wanted lens log P(target) - log P(ground truth) of each row, nats
    iterations: int = 3  # linearized solves (the RMSNorm makes one solve inexact)
    ridge: float = 1e-4  # eps of (G G^T + eps I), relative to each pair's diagonal entry
    norm_bound: float = 2.0  # an edited row's norm stays <= this x the layer's 99th percentile
    norm_sample: int = 4096  # evenly spaced rows per layer read for that percentile


@dataclass
class LensMargins:
    """The lens margins ``f`` of every (fact, row) pair of an edit (module docstring).

    - ``margin``: mean f, nats.
    - ``won``: share of pairs with f > 0 (the row alone says the target over the ground truth).
    """

    margin: float
    won: float


@dataclass
class LensEditReport:
    """What ``lens_edit`` made: the patch and the lens margins before and after it (of the
    rows as stored, FP8 re-quantization included)."""

    patch: Patch
    facts: int
    rows_touched: int
    seconds: float
    before: LensMargins | None
    after: LensMargins | None
    unsolved: list[int] = field(default_factory=list)  # facts with a row that still says
    # the ground truth (f <= 0) after the edit

    @property
    def edits_per_s(self) -> float:
        return self.facts / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class _Pairs:
    """The (fact, row) pairs of one layer: row index into ``rows``, column, fact."""

    rows: np.ndarray  # sorted unique global row ids
    row: np.ndarray  # [P] index into rows
    column: np.ndarray  # [P]
    fact: np.ndarray  # [P]


def _pairs(files: ModelFiles, layer_id: int, fact_rows: list[np.ndarray]) -> _Pairs:
    rows = np.unique(np.concatenate(fact_rows)) if fact_rows else np.zeros(0, np.int64)
    every = np.concatenate(fact_rows) if fact_rows else np.zeros(0, np.int64)
    fact = np.concatenate([np.full(len(r), i) for i, r in enumerate(fact_rows)]
                          ) if fact_rows else np.zeros(0, np.int64)
    column = np.searchsorted(files.hasher.offsets[layer_id], every, side="right") - 1
    return _Pairs(rows, np.searchsorted(rows, every), column, fact.astype(np.int64))


def _margins(files: ModelFiles, weights: dict[int, np.ndarray], pairs: _Pairs, x: np.ndarray,
             a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f of every pair and its gradient with respect to the pair's row ``[P, width]``."""
    d = files.config.hidden_size
    f = np.zeros(len(pairs.row), np.float64)
    grad = np.zeros((len(pairs.row), x.shape[1]), np.float64)
    for c, w in weights.items():  # w: [hidden, width] of column c
        sel = np.flatnonzero(pairs.column == c)
        v = x[pairs.row[sel]] @ w.T  # [n, hidden]
        rms = np.sqrt(np.mean(np.square(v), -1) + files.config.rms_norm_eps)
        av = np.sum(a[pairs.fact[sel]] * v, -1)
        f[sel] = av / rms
        dv = (a[pairs.fact[sel]] - (av / (d * rms ** 2))[:, None] * v) / rms[:, None]
        grad[sel] = dv @ w
    return f, grad


def _step(pairs: _Pairs, f: np.ndarray, grad: np.ndarray, wanted: float,
          ridge: float) -> np.ndarray:
    """The minimum-norm change of every row ``[len(rows), width]`` (pairs on a row jointly)."""
    need = np.maximum(wanted - f, 0.0)
    delta = np.zeros((len(pairs.rows), grad.shape[1]), np.float64)
    order = np.argsort(pairs.row, kind="stable")
    for members in np.split(order, np.flatnonzero(np.diff(pairs.row[order])) + 1):
        if not need[members].any():
            continue
        g = grad[members]
        gram = g @ g.T
        gram += np.diag(ridge * np.maximum(gram.diagonal(), 1e-12))
        delta[pairs.row[members[0]]] = np.linalg.solve(gram, need[members]) @ g
    return delta


def _moved(x: np.ndarray, delta: np.ndarray, bound: float) -> np.ndarray:
    """``x + delta``, each moved row scaled down to norm ``bound`` when above it."""
    y = x + delta
    norm = np.linalg.norm(y, axis=-1, keepdims=True)
    moved = delta.any(axis=-1, keepdims=True)
    return np.where(moved, y * np.minimum(1.0, bound / np.maximum(norm, 1e-12)), x)


def _norm_bound(table, layer_id: int, settings: LensSettings) -> float:
    n = table.num_rows(layer_id)
    sample = np.unique(np.linspace(0, n - 1, min(n, settings.norm_sample)).astype(np.int64))
    return settings.norm_bound * float(np.quantile(table.norms(layer_id, sample), 0.99))


def _summary(f: list[np.ndarray]) -> LensMargins | None:
    every = np.concatenate(f) if f else np.zeros(0)
    if not len(every):
        return None
    return LensMargins(float(every.mean()), float((every > 0).mean()))


def lens_edit(files: ModelFiles, facts: list[Fact], settings: LensSettings | None = None,
              rows: RowChoice = RowChoice.AUTO, ngram_count: NgramCount | None = None
              ) -> LensEditReport:
    """The patch that makes each located row, alone in its column, say the fact's target
    through the logit lens (module docstring). Reads the rows, the value rows of ``wkv`` for
    the touched columns, the final norm and the head rows of the tokens involved (the whole
    head, in chunks, only for facts without a ground truth). Writes nothing. The patch's
    metadata holds the facts, settings and the lens margins; the whole-network metrics are
    None (they cannot be measured without the network).

    Args:
        files (`ModelFiles`): a directory with a logit lens (``layout`` "v4").
        facts (`list[Fact]`): from ``facts.read_facts``.
        settings (`LensSettings`, optional): margin, steps, ridge, norm bound.
        rows (`RowChoice`, defaults to auto): which rows (locate.py).
        ngram_count (`NgramCount`, optional): corpus n-gram counts for ``auto``.

    Returns:
        `LensEditReport`

    Raises:
        BadInputError: a fact that encodes to no tokens, a tensor the lens needs is missing.

    Example:
        >>> report = lens_edit(open_model("V4.1-dir"), read_facts("facts.jsonl"))  # doctest: +SKIP
        >>> report.after.won  # doctest: +SKIP
        1.0
    """
    settings = settings or LensSettings()
    start = time.perf_counter()
    tok, config = files.tokenizer, files.config
    tokens = [tokenize_fact(f, tok) for f in facts]
    fact_rows = [locate_rows(t, tok, files.hasher, rows, ngram_count) for t in tokens]
    targets = [t.target[0] for t in tokens]
    truths = [t.truth[0] if t.truth and t.truth[0] != t.target[0] else None for t in tokens]
    ids = sorted({*targets, *(g for g in truths if g is not None)})
    unembed = dict(zip(ids, lens.head_rows(files, ids), strict=True))
    if None in truths:
        mean = sum(chunk.sum(0, dtype=np.float64) for _, chunk in lens.head_chunks(files))
        unembed[None] = (mean / config.vocab_size).astype(np.float32)
    norm = lens.final_norm(files).astype(np.float64)
    a = np.stack([norm * (unembed[t] - unembed[g]) for t, g in zip(targets, truths, strict=True)]
                 ) if facts else np.zeros((0, config.hidden_size))
    width = config.engram_head_dim
    values, before, after = {}, [], []
    unsolved: set[int] = set()
    with files.table() as table:
        for lid in config.engram_layer_ids:
            pairs = _pairs(files, lid, [fr.rows[lid] for fr in fact_rows])
            if not len(pairs.rows):
                continue
            columns = sorted(set(pairs.column.tolist()))
            w = lens.value_projection(files, lid, columns).astype(np.float64)
            weights = {c: w[:, k * width:(k + 1) * width] for k, c in enumerate(columns)}
            x = table.read_rows(lid, pairs.rows).astype(np.float64)
            before.append(_margins(files, weights, pairs, x, a)[0])
            bound = _norm_bound(table, lid, settings)
            for _ in range(settings.iterations):
                f, grad = _margins(files, weights, pairs, x, a)
                x = _moved(x, _step(pairs, f, grad, settings.margin, settings.ridge), bound)
            moved = np.flatnonzero((x != table.read_rows(lid, pairs.rows)).any(-1))
            values[lid] = (pairs.rows[moved], x[moved].astype(np.float32))
            x[moved] = table.encode(lid, values[lid][1]).values()  # as stored
            f = _margins(files, weights, pairs, x, a)[0]
            after.append(f)
            unsolved.update(pairs.fact[f <= 0].tolist())
        patch = rows_patch(table, files.fingerprint(), values)
    seconds = time.perf_counter() - start
    report = LensEditReport(patch, len(facts), patch.rows_touched, seconds, _summary(before),
                            _summary(after), sorted(unsolved))
    patch.metadata = {
        "facts": [f.to_dict() for f in facts],
        "method": "overwrite",
        "settings": {"rows": RowChoice(rows).value, "objective": "logit lens",
                     "lens": asdict(settings)},
        "metrics": {"before": None, "after": None,  # need the whole network
                    "lens_before": report.before and asdict(report.before),
                    "lens_after": report.after and asdict(report.after)},
        "seconds": seconds,
        "unsolved": report.unsolved,
        "version": tool_version(),
        "fingerprint": files.fingerprint(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return report
