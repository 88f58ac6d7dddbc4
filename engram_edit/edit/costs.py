"""What changing a table row costs an edit: both methods take the change of least cost-weighted
norm (the closed form exactly, distill by scaling each row's Adam step by 1 / cost), so costly
rows move less and the edit goes into cheap ones.

A row's cost is the product of two counts of what else depends on it:
- how much the corpus reads it (the occurrences of the indexed n-grams hashed onto it, over the
  layer's median row; only with a corpus n-gram index);
- how many of the facts at hand touch it: the batch's, and with distill the facts of applied
  patches that it keeps solved. A row several facts touch is pushed toward several targets at
  once and piles up their changes (an n-gram such as " of E" opens many subjects), and a row an
  earlier patch moved would move further. Such rows hit everything hashed onto them hardest:
  in a benchmark sequence of 10 patches, each known fact that was lost was lost to one or two
  rows read at its last position, moved by 3 to 7 (rows have norm 1 to 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engram_edit.edit.locate import FactRows

READ_COST_FLOOR = 0.25  # the read cost of the least-read rows, relative to a median one


def read_costs(occurrences: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per Engram layer, the cost of changing each row from the corpus occurrences of the
    indexed n-grams that read it (``NgramIndex.slot_loads(layer)[1]``): over the layer's median,
    at least ``READ_COST_FLOOR``. A change to a row shifts every one of those occurrences."""
    return {lid: np.maximum(occ / max(float(np.median(occ)), 1.0), READ_COST_FLOOR)
            for lid, occ in occurrences.items()}


@dataclass
class RowCosts:
    """The cost of changing rows: the corpus's reads (``read_costs``; 1 everywhere without)
    times how many of the facts touch each row (1 for a row none touches)."""

    touches: dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (sorted rows, facts on each)
    reads: Mapping[int, np.ndarray] | None = None  # layer -> read cost of every row

    @classmethod
    def of_facts(cls, fact_rows: Sequence[FactRows],
                 reads: Mapping[int, np.ndarray] | None = None) -> RowCosts:
        """Costs that count the touches of ``fact_rows`` (each fact's rows, locate.py)."""
        layers = {lid for fr in fact_rows for lid in fr.rows}
        touches = {lid: np.unique(np.concatenate([fr.rows.get(lid, np.zeros(0, np.int64))
                                                  for fr in fact_rows]), return_counts=True)
                   for lid in layers}
        return cls(touches, reads)

    def __call__(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """float64 costs of ``rows`` (row ids) of Engram layer ``layer``."""
        rows = np.asarray(rows, dtype=np.int64)
        cost = (np.ones(len(rows)) if self.reads is None
                else self.reads[layer][rows].astype(np.float64))
        touched, count = self.touches.get(layer, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        if len(touched):
            at = np.searchsorted(touched, rows).clip(max=len(touched) - 1)
            cost *= np.where(touched[at] == rows, count[at], 1)
        return cost
