"""benchmarks/overhead.py's paired ratio: the median of per-round step ratios and its distribution-free
interval, the figure that says what one benchmark run can resolve."""
import math
import random

import pytest

from conftest import load_benchmark

paired_ratio = load_benchmark('overhead').paired_ratio


def test_paired_ratio_is_the_median_of_the_per_round_ratios_not_the_ratio_of_medians():
    base = [1.0, 2.0, 4.0]  # a load that doubles from round to round: both steps of a round see it
    ours = [1.1, 2.2, 4.4]
    median, low, high = paired_ratio(base, ours)
    assert median == pytest.approx(1.1)
    assert (low, high) == (pytest.approx(1.1), pytest.approx(1.1))
    assert paired_ratio([1.0, 1.0, 4.0], [1.0, 4.0, 1.0])[0] == pytest.approx(1.0)  # ratios 1, 4, 1/4


@pytest.mark.parametrize('n,ranks', [(5, (1, 5)), (6, (1, 6)), (15, (4, 12)), (25, (8, 18)), (100, (40, 61))])
def test_interval_uses_the_binomial_order_statistics_of_the_median(n, ranks):
    # ratios 1..n in a shuffled order: the interval's ends are the ranks of the textbook table
    ratios = list(range(1, n + 1))
    random.Random(n).shuffle(ratios)
    median, low, high = paired_ratio([1.0] * n, [float(r) for r in ratios])
    assert (low, high) == ranks
    assert median == (n + 1) / 2
    k = ranks[0]
    if k > 1:  # the coverage is at least 95 %, and one rank further in would drop below it
        tail = sum(math.comb(n, j) for j in range(k)) / 2 ** n
        assert 1 - 2 * tail >= 0.95
        assert 1 - 2 * (tail + math.comb(n, k) / 2 ** n) < 0.95


def test_rounds_of_unequal_length_or_none_are_refused():
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match='at least one round'):
        paired_ratio([], [])
