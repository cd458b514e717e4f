"""Intervals over seeds and the seed 004 §2 scenario verdict computed from them (rule: docs/verdict.md).

Per pair of modes (a, b) with values over seeds:
  different   — the two Student-t intervals are disjoint and |mean_a − mean_b| > δ,
  equivalent  — the Welch t-interval of mean_a − mean_b lies inside [−δ, δ],
  unresolved  — neither (including when either mode has fewer than two seeds),
with δ = margin · (mean_a + mean_b) / 2. Scenario from the three pairs learned/frozen, learned/none,
frozen/none: A = (different, different, equivalent); B = (equivalent, different, different);
C = all different; "neither" = all equivalent; anything else is "undetermined".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

VERDICT_MODES = ("learned", "frozen", "none")
PAIRS = (("learned", "frozen"), ("learned", "none"), ("frozen", "none"))
SCENARIOS = {
    "A": ("different", "different", "equivalent"),
    "B": ("equivalent", "different", "different"),
    "C": ("different", "different", "different"),
    "neither": ("equivalent", "equivalent", "equivalent"),
}
STATEMENTS = {
    "A": "Scenario A — γ drives rank: learned γ differs from both frozen γ and no QK-Norm, which agree.",
    "B": "Scenario B — normalisation drives rank: learned and frozen γ agree, no QK-Norm differs from both.",
    "C": "Scenario C — both contribute: all three modes differ.",
    "neither": "Neither drives rank: all three modes agree within the margin.",
    "undetermined": "Undetermined: the data do not single out one scenario.",
}


def t_interval(values, level: float) -> tuple[float, float, float, int]:
    """Mean and Student-t interval over seeds: mean ± t_{(1+level)/2, n−1} · s / √n; NaN bounds when n < 2."""
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def welch_interval(a, b, level: float) -> tuple[float, float, float]:
    """Difference of means mean_a − mean_b and its Welch t-interval (Welch–Satterthwaite degrees of freedom)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof) * se)
    return diff, diff - half, diff + half


@dataclass
class PairEvidence:
    a: str
    b: str
    relation: str
    difference: float
    difference_ci_low: float
    difference_ci_high: float
    margin: float


def pair_relation(a_values, b_values, level: float, margin_fraction: float, names=("a", "b")) -> PairEvidence:
    """Whether two modes differ, are equivalent within δ, or cannot be told apart (module docstring)."""
    mean_a, low_a, high_a, n_a = t_interval(a_values, level)
    mean_b, low_b, high_b, n_b = t_interval(b_values, level)
    diff, diff_low, diff_high = welch_interval(a_values, b_values, level)
    margin = margin_fraction * (mean_a + mean_b) / 2
    relation = "unresolved"
    if n_a >= 2 and n_b >= 2:
        if -margin <= diff_low and diff_high <= margin:
            relation = "equivalent"
        elif (high_a < low_b or high_b < low_a) and abs(diff) > margin:
            relation = "different"
    return PairEvidence(names[0], names[1], relation, diff, diff_low, diff_high, margin)


def ordering(means: dict[str, float]) -> str:
    """Point estimates from lowest to highest, e.g. 'frozen < none < learned'."""
    return " < ".join(sorted(means, key=means.get))


def scenario(values_by_mode: dict[str, list[float]], level: float, margin_fraction: float) -> dict:
    """The verdict and its evidence for one quantity (e.g. final mean key PR) given its values per mode."""
    modes = {}
    for mode, values in values_by_mode.items():
        mean, low, high, n = t_interval(values, level)
        modes[mode] = {"mean": mean, "ci_low": low, "ci_high": high, "n": n}
    result = {"ci_level": level, "margin_fraction": margin_fraction, "modes": modes, "pairs": [],
              "ordering": ordering({m: v["mean"] for m, v in modes.items()})}
    missing = [m for m in VERDICT_MODES if m not in values_by_mode]
    if missing:
        return result | {"scenario": "undetermined", "statement": STATEMENTS["undetermined"],
                         "reason": f"needs all of {', '.join(VERDICT_MODES)}; missing {', '.join(missing)}"}
    pairs = [pair_relation(values_by_mode[a], values_by_mode[b], level, margin_fraction, (a, b)) for a, b in PAIRS]
    result["pairs"] = [asdict(p) for p in pairs]
    relations = tuple(p.relation for p in pairs)
    few = [m for m in VERDICT_MODES if modes[m]["n"] < 2]
    if few:
        reason = f"fewer than 2 seeds for {', '.join(few)}: no confidence interval"
    else:
        reason = "; ".join(f"{p.a} vs {p.b}: {p.relation}" for p in pairs)
    for name, pattern in SCENARIOS.items():
        if relations == pattern:
            return result | {"scenario": name, "statement": STATEMENTS[name], "reason": reason}
    if not few:
        reason += " — not the pattern of any scenario" if "unresolved" not in relations else \
            " — an unresolved pair: intervals overlap but are wider than the equivalence margin"
    return result | {"scenario": "undetermined", "statement": STATEMENTS["undetermined"], "reason": reason}
