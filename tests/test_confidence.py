"""Confidence bounds: known values and coverage (failure rate <= alpha over many repetitions)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.confidence import bernstein_bounds, binomial_tails, clopper_pearson_bounds, hoeffding_bounds
from helpers import FLOAT64_EPS, float64_sum_tolerance

REPEATS = 4000
ALPHA = 0.05


def test_hoeffding_width_is_the_textbook_value():
    lower, upper = hoeffding_bounds(0.5, 100, 0.05)
    width = math.sqrt(math.log(20.0) / 200)  # 0.12239
    # float64: 1 / alpha, log (1 ulp, numpy's and math's may differ), / 2n, sqrt, +- 0.5: 6 roundings.
    tolerance = float64_sum_tolerance(6)
    assert lower == pytest.approx(0.5 - width, rel=tolerance) and upper == pytest.approx(0.5 + width, rel=tolerance)
    assert round(width, 5) == 0.12239
    # Bonferroni over 10 hypotheses is the same as alpha / 10.
    assert hoeffding_bounds(0.5, 100, 0.05, 10)[0] == pytest.approx(hoeffding_bounds(0.5, 100, 0.005)[0], rel=tolerance)


def test_clopper_pearson_known_values():
    # k = 0: upper = 1 - alpha^(1/n); k = n: lower = alpha^(1/n).
    lower, upper = clopper_pearson_bounds(0, 10, 0.05)
    assert lower == 0.0 and upper == pytest.approx(1 - 0.05 ** 0.1)
    lower, upper = clopper_pearson_bounds(10, 10, 0.05)
    assert upper == 1.0 and lower == pytest.approx(0.05 ** 0.1)
    lower, upper = clopper_pearson_bounds(np.array([3, 50]), np.array([10, 100]), 0.05)
    assert np.all(lower < np.array([0.3, 0.5])) and np.all(upper > np.array([0.3, 0.5]))


def _failure_rates(lower, upper, mean):
    return float((lower > mean).mean()), float((upper < mean).mean())


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_bounds_cover_a_bernoulli_mean(p):
    rng = np.random.default_rng(1)
    n = 60
    draws = rng.random((REPEATS, n)) < p
    mean = draws.mean(1)
    for lower, upper in (
        hoeffding_bounds(mean, n, ALPHA),
        bernstein_bounds(mean, mean, n, ALPHA),  # x^2 = x for 0/1 draws
        clopper_pearson_bounds(draws.sum(1), n, ALPHA),
    ):
        low_fail, up_fail = _failure_rates(lower, upper, p)
        # The empirical rate estimates a probability <= alpha; allow 3 standard errors.
        slack = 3 * math.sqrt(ALPHA * (1 - ALPHA) / REPEATS)
        assert low_fail <= ALPHA + slack and up_fail <= ALPHA + slack


def test_bounds_cover_a_uniform_mean_and_tighten_with_small_variance():
    rng = np.random.default_rng(2)
    n = 200
    for low, high in ((0.0, 1.0), (0.7, 0.8)):
        draws = rng.uniform(low, high, (REPEATS, n))
        mean, mean_sq = draws.mean(1), (draws**2).mean(1)
        truth = (low + high) / 2
        for lower, upper in (hoeffding_bounds(mean, n, ALPHA), bernstein_bounds(mean, mean_sq, n, ALPHA)):
            low_fail, up_fail = _failure_rates(lower, upper, truth)
            assert low_fail <= ALPHA and up_fail <= ALPHA
    # A low-variance variable: Bernstein is tighter than Hoeffding.
    assert (bernstein_bounds(mean, mean_sq, n, ALPHA)[0] > hoeffding_bounds(mean, n, ALPHA)[0]).all()


def test_bernstein_needs_two_draws():
    with pytest.raises(ValueError):
        bernstein_bounds(0.5, 0.25, 1, 0.05)


@pytest.mark.parametrize("n, p", [(1, 0.5), (7, 0.3), (100, 0.1), (2000, 0.1), (300, 0.75)])
def test_binomial_tails_are_scipys_and_agree_with_clopper_pearson(n, p):
    from scipy.stats import binom

    tails = binomial_tails(n, p)
    expected = binom.sf(np.arange(n + 1) - 1, n, p)
    # Each term is exp of a sum of 5 logs (3 lgamma, 2 log) of magnitude up to `size`, rounded a
    # few times each (6 roundings of `size`: an absolute error in the exponent is a relative one in
    # the term); a tail then sums up to n + 1 terms. scipy's tails carry as much error again. Below
    # 1e-300, near float64's subnormals, terms lose relative precision: compared absolutely there.
    size = 3 * math.lgamma(n + 1) + n * (abs(math.log(p)) + abs(math.log1p(-p)))
    tolerance = 2 * (float64_sum_tolerance(n + 1) + 6 * FLOAT64_EPS * size)
    assert np.allclose(tails, expected, rtol=tolerance, atol=1e-300)
    # The test rejects "probability <= p" at alpha exactly where the exact lower bound is above p.
    alpha = 0.001
    lower, _ = clopper_pearson_bounds(np.arange(n + 1), n, alpha)
    decided = np.abs(tails - alpha) > 1e-9  # away from the tie, where rounding decides either way
    assert np.array_equal((tails <= alpha)[decided], (lower > p)[decided])


def test_binomial_tails_at_probabilities_zero_and_one():
    assert binomial_tails(3, 0.0).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert binomial_tails(3, 1.0).tolist() == [1.0, 1.0, 1.0, 1.0]
