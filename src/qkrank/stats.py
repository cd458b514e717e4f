"""Paired comparisons of two modes over seeds, the pair decision with Holm control, and power (docs/verdict.md).

Every function works on arrays whose last axis is the seeds, so one call decides one study or many
thousand simulated ones (``qkrank.calibration``). The tests are scipy.stats' one-sample t-tests on the
per-seed differences d_s = a_s − b_s (identical to ``scipy.stats.ttest_rel`` and, for equivalence, to
statsmodels' ``ttost_paired``; tests/test_stats.py checks both), or Welch's ``ttest_ind`` when the seeds
of the two modes do not line up. Power comes from statsmodels' ``TTestPower``.

For a pair with margin δ > 0 and family-wise level α:
  equivalent  — TOST: H0 |d| ≥ δ rejected (both one-sided tests at the adjusted level);
  different   — minimum-effect test: H0 |d| ≤ δ rejected on one side, and the two-sided test of d = 0
                rejects at α (the paired interval excludes 0);
  unresolved  — neither.
Per pair the claim with the smaller p-value is the candidate (at most one of the two can hold); Holm's
step-down over the pairs of one verdict controls the chance of any wrong claim at α.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats
from statsmodels.stats.power import TTestPower

MAX_SEEDS = 1000  # the planner gives up beyond this many seeds ("not resolvable at this spread")


def _ttest(a: np.ndarray, b: np.ndarray, shift, paired: bool, alternative: str):
    """t-test of mean(a − b) against ``shift`` (per leading index), paired or Welch."""
    shift = np.asarray(shift, dtype=float)[..., None]
    if paired:
        return stats.ttest_1samp(a - b, shift, axis=-1, alternative=alternative)
    return stats.ttest_ind(a - shift, b, axis=-1, equal_var=False, alternative=alternative)


def pair_tests(a, b, delta, alpha: float, level: float, paired: bool = True) -> dict[str, np.ndarray]:
    """Estimate, spread, intervals and the three p-values of mean(a − b) for margin ``delta`` (module docstring).

    ``a`` and ``b``: (..., n) arrays of values over seeds (paired: the same seeds in the same order);
    ``delta``: the margin per leading index. Returns arrays over the leading axes: estimate, sd (of the
    per-seed differences; Welch: √(s_a² + s_b²)), df, ci_low/ci_high (two-sided at ``level``),
    tost_low/tost_high (the 1 − 2α interval TOST reads), p_zero (d = 0, two-sided), p_equivalent (TOST),
    p_different (minimum-effect test, the side of the estimate).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    delta = np.broadcast_to(np.asarray(delta, dtype=float), a.shape[:-1])
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        # identical differences over seeds (SD 0) give scipy's precision-loss warning and a NaN/inf statistic;
        # decide() treats a NaN p-value as "not rejected"
        warnings.simplefilter("ignore", RuntimeWarning)
        base = _ttest(a, b, np.zeros_like(delta), paired, "two-sided")
        ci, tost = base.confidence_interval(level), base.confidence_interval(1 - 2 * alpha)
        above = _ttest(a, b, delta, paired, "greater").pvalue   # H1: d > δ
        below = _ttest(a, b, -delta, paired, "less").pvalue     # H1: d < −δ
        inside_low = _ttest(a, b, -delta, paired, "greater").pvalue  # H1: d > −δ
        inside_high = _ttest(a, b, delta, paired, "less").pvalue     # H1: d < δ
    if paired:
        estimate, sd = (a - b).mean(axis=-1), (a - b).std(axis=-1, ddof=1)
    else:
        estimate = a.mean(axis=-1) - b.mean(axis=-1)
        sd = np.sqrt(a.var(axis=-1, ddof=1) + b.var(axis=-1, ddof=1))
    return {"estimate": estimate, "sd": sd, "df": np.asarray(base.df, dtype=float),
            "ci_low": ci.low, "ci_high": ci.high, "tost_low": tost.low, "tost_high": tost.high,
            "p_zero": base.pvalue, "p_equivalent": np.fmax(inside_low, inside_high),
            "p_different": np.fmin(above, below)}


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values over the last axis (NaN counts as 1); equals statsmodels' 'holm'."""
    p = np.nan_to_num(np.asarray(p, dtype=float), nan=1.0)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1)
    ranked = np.take_along_axis(p, order, axis=-1) * (m - np.arange(m))
    adjusted = np.minimum(np.maximum.accumulate(ranked, axis=-1), 1.0)
    out = np.empty_like(adjusted)
    np.put_along_axis(out, order, adjusted, axis=-1)
    return out


def decide(tests: dict[str, np.ndarray], alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Relations ('equivalent', 'different', 'unresolved') and Holm-adjusted p-values; last axis = the pairs."""
    p_eq = np.nan_to_num(tests["p_equivalent"], nan=1.0)
    p_diff = np.nan_to_num(tests["p_different"], nan=1.0)
    claim_equivalent = p_eq <= p_diff
    adjusted = holm(np.fmin(p_eq, p_diff))
    different = ~claim_equivalent & (np.nan_to_num(tests["p_zero"], nan=1.0) <= alpha)
    relation = np.where(adjusted <= alpha, np.where(claim_equivalent, "equivalent",
                                                    np.where(different, "different", "unresolved")), "unresolved")
    return relation, adjusted


# ------------------------------------------------------------------------------------------- power


def resolve_power(estimate, sd, delta, n, alpha: float):
    """Chance that n seeds resolve a pair whose true paired difference is ``estimate`` with SD ``sd``.

    |estimate| > δ: power of the one-sided minimum-effect test, effect (|d| − δ)/sd. Otherwise TOST's power,
    bounded below by P(lower test) + P(upper test) − 1 (each one-sided at ``alpha``). ``alpha`` is the
    level one pair is tested at (the planner uses Holm's first, strictest step, α / number of pairs).
    """
    estimate, sd, delta, n = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (estimate, sd, delta, n)))
    power = TTestPower()
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.abs(estimate) - delta
        beyond = power.power(np.where(gap > 0, gap, 0.0) / sd, n, alpha, alternative="larger")
        low = power.power((delta + estimate) / sd, n, alpha, alternative="larger")
        high = power.power((delta - estimate) / sd, n, alpha, alternative="larger")
    inside = np.clip(low + high - 1, 0.0, 1.0)
    out = np.where(gap > 0, beyond, inside)
    return np.where((sd > 0) & (gap != 0), out, np.where(sd == 0, 1.0, 0.0))


def seeds_needed(estimate, sd, delta, alpha: float, power: float = 0.8, max_seeds: int = MAX_SEEDS):
    """Smallest number of seeds (≥ 2) whose ``resolve_power`` reaches ``power``; None beyond ``max_seeds``."""
    n = np.arange(2, max_seeds + 1)
    reached = np.nonzero(resolve_power(estimate, sd, delta, n, alpha) >= power)[0]
    return int(n[reached[0]]) if len(reached) else None


def study_seeds(pairs: list[tuple[float, float, float]], alpha: float, power: float = 0.8,
                max_seeds: int = MAX_SEEDS):
    """Smallest n at which all pairs (estimate, sd, δ) are resolved together with chance ≥ ``power``.

    The joint chance is taken as the product of the pairs' powers (each at α / number of pairs).
    """
    n = np.arange(2, max_seeds + 1)
    joint = np.ones(len(n))
    for estimate, sd, delta in pairs:
        if not all(math.isfinite(x) for x in (estimate, sd, delta)):
            return None
        joint = joint * resolve_power(estimate, sd, delta, n, alpha / len(pairs))
    reached = np.nonzero(joint >= power)[0]
    return int(n[reached[0]]) if len(reached) else None
