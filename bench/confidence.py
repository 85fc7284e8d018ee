"""Confidence bounds: for Monte Carlo certificates (PixelDP, randomized smoothing) and for the
intervals of the reports' proportions.

The ``*_bounds`` functions return one-sided bounds on the expectation of a bounded random variable from
``n`` independent draws. Each bound holds on its own with probability at least
``1 - alpha / hypotheses``; pass ``hypotheses = k`` (Bonferroni) when k bounds must hold at once,
e.g. the top class's lower bound and the other classes' upper bounds in a robustness test.
Inputs broadcast like numpy arrays; outputs are float64 numpy arrays.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def hoeffding_bounds(
    mean: ArrayLike, n: int, alpha: float, hypotheses: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Hoeffding bounds on E[X] for X in [0, 1] from the mean of ``n`` draws.

    P(E[X] < mean - w) <= alpha / hypotheses and likewise for the upper side, with
    w = sqrt(ln(hypotheses / alpha) / (2 n)).
    """
    mean = np.asarray(mean, dtype=np.float64)
    width = np.sqrt(np.log(hypotheses / alpha) / (2.0 * n))
    return np.clip(mean - width, 0.0, 1.0), np.clip(mean + width, 0.0, 1.0)


def bernstein_bounds(
    mean: ArrayLike, mean_of_squares: ArrayLike, n: int, alpha: float, hypotheses: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Empirical Bernstein bounds on E[X] for X in [0, 1] (Maurer & Pontil 2009, Theorem 4).

    Uses the unbiased sample variance V from the first two moments of ``n >= 2`` draws:
    w = sqrt(2 V ln(2 h / alpha) / n) + 7 ln(2 h / alpha) / (3 (n - 1)), h = hypotheses.
    Tighter than Hoeffding when the variance is small (confident softmax scores), looser for
    few draws because of the 1/n term.
    """
    if n < 2:
        raise ValueError("empirical Bernstein bounds need at least 2 draws")
    mean = np.asarray(mean, dtype=np.float64)
    mean_of_squares = np.asarray(mean_of_squares, dtype=np.float64)
    # Rounding can make the variance a tiny negative number: clip it at 0.
    variance = np.maximum(n / (n - 1) * (mean_of_squares - mean**2), 0.0)
    log_term = np.log(2.0 * hypotheses / alpha)
    width = np.sqrt(2.0 * variance * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))
    return np.clip(mean - width, 0.0, 1.0), np.clip(mean + width, 0.0, 1.0)


def clopper_pearson_bounds(
    successes: ArrayLike, trials: ArrayLike, alpha: float, hypotheses: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) one-sided bounds on a Bernoulli probability.

    ``lower`` is the ``alpha/hypotheses`` quantile of Beta(k, n - k + 1) and ``upper`` the
    ``1 - alpha/hypotheses`` quantile of Beta(k + 1, n - k); lower = 0 when k = 0 and
    upper = 1 when k = n. Both sides at ``alpha`` together form a two-sided interval at ``2 alpha``
    (Cohen et al.'s smoothing passes ``alpha`` here for its one-sided lower bound). NaN where
    ``trials`` is 0 (no draws bound nothing).
    """
    # Imported here: scipy.stats costs about a second to import, which a command that fails on
    # bad input before any certificate should not pay.
    from scipy.stats import beta

    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    level = alpha / hypotheses
    with np.errstate(invalid="ignore"):  # beta.ppf is nan where a shape is 0; replaced below
        lower = np.where(k > 0, beta.ppf(level, np.maximum(k, 1e-12), n - k + 1), 0.0)
        upper = np.where(k < n, beta.ppf(1.0 - level, k + 1, np.maximum(n - k, 1e-12)), 1.0)
    empty = n <= 0
    return np.where(empty, np.nan, lower).astype(np.float64), np.where(empty, np.nan, upper).astype(np.float64)


def clopper_pearson_interval(
    successes: ArrayLike, trials: ArrayLike, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided exact binomial interval that covers the true proportion with probability at
    least ``confidence``: the one-sided bounds of :func:`clopper_pearson_bounds` at
    ``(1 - confidence) / 2`` each. Conservative, and valid at the proportions 0 and 1 where
    robustness results often sit; NaN where ``trials`` is 0."""
    return clopper_pearson_bounds(successes, trials, (1.0 - confidence) / 2.0)


def binomial_tails(n: int, p: float) -> np.ndarray:
    """``P(X >= k)`` for k = 0 .. n, X ~ Binomial(n, p): the p-values of the exact one-sided
    binomial test of "success probability <= p" after k successes in n trials. It rejects at
    ``alpha`` exactly where :func:`clopper_pearson_bounds`' lower bound at ``alpha`` is above ``p``.
    Plain Python and numpy: training checks need it, and scipy.stats costs 1-3 s to import."""
    if p <= 0.0 or p >= 1.0:
        return np.where(np.arange(n + 1) == 0, 1.0, 1.0 if p >= 1.0 else 0.0)
    log_pmf = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                        + j * math.log(p) + (n - j) * math.log1p(-p) for j in range(n + 1)])
    tails = np.cumsum(np.exp(log_pmf)[::-1])[::-1]  # summed from the small far tail up, for accuracy there
    return np.minimum(tails, 1.0)


# How sure the harness must be that a model does better than guessing before it counts it as
# having learned (``at_chance``).
CHANCE_ALPHA = 0.001


def most_right_by_guessing(n: int, p: float, alpha: float) -> int | None:
    """The most right answers out of ``n`` that the exact binomial test at ``alpha`` cannot tell
    from guessing right with probability ``p``: a guesser gets at most this many with probability
    >= 1 - ``alpha``, and more is significantly above chance. None when even ``n`` right answers
    cannot be told from guessing (too few trials)."""
    significant = np.flatnonzero(binomial_tails(n, p) <= alpha)
    return int(significant[0]) - 1 if len(significant) else None


def chance_level(labels: ArrayLike, num_classes: int | None = None) -> float:
    """The accuracy a model reaches without looking at the inputs: the largest class's share of
    ``labels`` (a constant prediction), or 1 / ``num_classes`` where that is larger."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    largest = float(np.bincount(labels).max()) / len(labels) if len(labels) else 0.0
    return max(1.0 / num_classes if num_classes else 0.0, largest)


def at_chance(correct: int, n: int, chance: float, num_classes: int | None = None, inputs: str = "inputs") -> str | None:
    """The chance rule, for training (``bench.training.check_learned`` fails the run) and for
    evaluation (``bench.metrics.sanity_warnings`` warns): ``correct`` right answers of ``n`` are at
    ``chance`` when the exact one-sided binomial test of "accuracy <= chance" does not reject at
    ``CHANCE_ALPHA`` (equivalently, the Clopper-Pearson lower bound is at most chance). A guesser is
    caught with probability >= 1 - ``CHANCE_ALPHA`` whatever ``n``; the margin above chance that the
    test allows shrinks as ``n`` grows (10 classes: 0.10 on 100 inputs, 0.057 on 300, 0.022 on 2,000).

    Returns the finding, ``accuracy A <= chance C (why) + M, what guessing reaches ... on n inputs``,
    or None: significantly above chance, or ``n`` too few to tell (``most_right_by_guessing`` is None).
    """
    guessed = most_right_by_guessing(n, chance, CHANCE_ALPHA)
    if guessed is None or correct > guessed:
        return None
    why = f"1 of {num_classes} classes" if num_classes and chance == 1.0 / num_classes else "the largest class's share"
    return (f"accuracy {correct / n:.3f} <= chance {chance:.3f} ({why}) + {guessed / n - chance:.3f}, "
            f"what guessing reaches with probability {1 - CHANCE_ALPHA:g} on {n} {inputs}")
