import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_edit.edit.costs import RowCosts
from engram_edit.edit.locate import FactRows

N_ROWS = 40


def fact(rows0, rows2=()):
    return FactRows({0: np.unique(np.array(rows0, dtype=np.int64)),
                     2: np.unique(np.array(rows2, dtype=np.int64))})


def test_a_row_costs_the_number_of_facts_touching_it():
    costs = RowCosts.of_facts([fact([3, 5], [1]), fact([5, 9]), fact([5], [1])])
    assert costs(0, np.array([3, 5, 9, 4])).tolist() == [1.0, 3.0, 1.0, 1.0]
    assert costs(2, np.array([1, 3])).tolist() == [2.0, 1.0]


def test_without_facts_a_row_costs_its_reads():
    reads = {0: np.linspace(0.25, 4.0, N_ROWS), 2: np.full(N_ROWS, 2.0)}
    costs = RowCosts({}, reads)
    assert np.array_equal(costs(0, np.arange(N_ROWS)), reads[0])
    assert np.array_equal(costs(2, np.array([7])), [2.0])


rows = st.lists(st.integers(0, N_ROWS - 1), max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(rows, rows), max_size=6),
       st.lists(st.floats(0.25, 100.0), min_size=N_ROWS, max_size=N_ROWS))
def test_a_row_costs_its_reads_times_the_facts_on_it_or_once(facts, read):
    fact_rows = [fact(a, b) for a, b in facts]
    reads = {0: np.array(read), 2: np.array(read[::-1])}
    costs = RowCosts.of_facts(fact_rows, reads)
    for lid in (0, 2):
        got = costs(lid, np.arange(N_ROWS))
        on = [sum(int(r in fr.rows[lid]) for fr in fact_rows) for r in range(N_ROWS)]
        assert np.allclose(got, reads[lid] * np.maximum(on, 1))
