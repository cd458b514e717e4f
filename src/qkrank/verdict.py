"""The seed 004 §2 scenario verdict from paired comparisons of the three modes (rule: docs/verdict.md).

For each pair (learned, frozen), (learned, none), (frozen, none) the per-seed differences are tested
(``qkrank.stats``): *equivalent* (TOST inside ±δ), *different* (minimum-effect test beyond δ and the
paired interval excludes 0) or *unresolved*, with Holm's control of the three decisions at α, and
δ = margin · (mean_a + mean_b) / 2. Scenario: A = (different, different, equivalent); B = (equivalent,
different, different); C = all different; "neither" = all equivalent; anything else is "undetermined".
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sstats

from qkrank import stats

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


def scenario_names(relations: np.ndarray) -> np.ndarray:
    """Scenario per row of a (..., 3) array of pair relations in PAIRS order."""
    out = np.full(relations.shape[:-1], "undetermined", dtype=object)
    for name, pattern in SCENARIOS.items():
        out[np.all(relations == np.asarray(pattern), axis=-1)] = name
    return out


def simulate_verdicts(values: np.ndarray, margin: float, alpha: float, level: float = 0.95) -> np.ndarray:
    """Scenarios of many paired studies at once: ``values`` is (studies, 3 modes in VERDICT_MODES order, seeds)."""
    index = {m: i for i, m in enumerate(VERDICT_MODES)}
    a = np.stack([values[:, index[x], :] for x, _ in PAIRS], axis=1)
    b = np.stack([values[:, index[y], :] for _, y in PAIRS], axis=1)
    delta = margin * (a.mean(axis=-1) + b.mean(axis=-1)) / 2
    relation, _ = stats.decide(stats.pair_tests(a, b, delta, alpha, level), alpha)
    return scenario_names(relation)


def mode_interval(values, level: float) -> dict:
    """Mean over seeds, Student-t interval at ``level`` (NaN with fewer than two seeds) and n."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    if len(v) < 2:
        return {"mean": float(v.mean()), "ci_low": math.nan, "ci_high": math.nan, "n": 1}
    ci = sstats.ttest_1samp(v, 0).confidence_interval(level)
    return {"mean": float(v.mean()), "ci_low": float(ci.low), "ci_high": float(ci.high), "n": len(v)}


def compare(a: dict, b: dict, margin: float, alpha: float, level: float) -> dict:
    """Paired (or, when the seeds differ, Welch) evidence for mean(a − b); ``a``, ``b``: {seed: value}."""
    a = {s: v for s, v in a.items() if np.isfinite(v)}
    b = {s: v for s, v in b.items() if np.isfinite(v)}
    paired = sorted(a) == sorted(b)
    seeds = sorted(a) if paired else None
    xa = np.asarray([a[s] for s in seeds] if paired else list(a.values()), dtype=float)
    xb = np.asarray([b[s] for s in seeds] if paired else list(b.values()), dtype=float)
    delta = margin * (xa.mean() + xb.mean()) / 2 if len(xa) and len(xb) else math.nan
    out = {"method": "paired" if paired else "Welch (seeds differ between the modes)", "n_a": len(xa),
           "n_b": len(xb), "margin": float(delta)}
    if min(len(xa), len(xb)) < 2:
        nan = math.nan
        return out | {"estimate": float(xa.mean() - xb.mean()) if len(xa) and len(xb) else nan, "sd": nan,
                      "df": nan, "ci_low": nan, "ci_high": nan, "tost_low": nan, "tost_high": nan, "p_zero": nan,
                      "p_equivalent": nan, "p_different": nan}
    tests = stats.pair_tests(xa[None], xb[None], np.asarray([delta]), alpha, level, paired=paired)
    return out | {k: float(v[0]) for k, v in tests.items()}


def decide_pairs(pairs: list[dict], alpha: float) -> None:
    """Add 'relation' and 'p_adjusted' (Holm over ``pairs``) to each pair's evidence, in place."""
    tests = {k: np.asarray([[p[k] for p in pairs]], dtype=float) for k in ("p_equivalent", "p_different", "p_zero")}
    relation, adjusted = stats.decide(tests, alpha)
    for p, r, q in zip(pairs, relation[0], adjusted[0], strict=True):
        p["relation"], p["p_adjusted"] = str(r), float(q)


def ordering(means: dict[str, float]) -> str:
    """Point estimates from lowest to highest, e.g. 'frozen < none < learned'."""
    return " < ".join(sorted(means, key=means.get))


def scenario(values_by_mode: dict[str, dict], level: float, margin: float, alpha: float) -> dict:
    """The verdict and its evidence for one quantity; ``values_by_mode``: mode → {seed: value}."""
    modes = {m: mode_interval(list(v.values()), level) for m, v in values_by_mode.items()}
    result = {"ci_level": level, "alpha": alpha, "margin_fraction": margin, "modes": modes, "pairs": [],
              "ordering": ordering({m: v["mean"] for m, v in modes.items()})}
    present = [(a, b) for a, b in PAIRS if a in values_by_mode and b in values_by_mode]
    pairs = [{"a": a, "b": b} | compare(values_by_mode[a], values_by_mode[b], margin, alpha, level)
             for a, b in present]
    if pairs:
        decide_pairs(pairs, alpha)
    result["pairs"] = pairs
    missing = [m for m in VERDICT_MODES if m not in values_by_mode]
    if missing:
        return result | {"scenario": "undetermined", "statement": STATEMENTS["undetermined"],
                         "reason": f"needs all of {', '.join(VERDICT_MODES)}; missing {', '.join(missing)}"}
    relations = tuple(p["relation"] for p in pairs)
    few = [m for m in VERDICT_MODES if modes[m]["n"] < 2]
    if few:
        reason = f"fewer than 2 seeds for {', '.join(few)}: no interval"
    else:
        reason = "; ".join(f"{p['a']} vs {p['b']}: {p['relation']}" for p in pairs)
    for name, pattern in SCENARIOS.items():
        if relations == pattern:
            return result | {"scenario": name, "statement": STATEMENTS[name], "reason": reason}
    if not few:
        reason += " — an unresolved pair: more seeds needed (planner below)" if "unresolved" in relations else \
            " — not the pattern of any scenario"
    return result | {"scenario": "undetermined", "statement": STATEMENTS["undetermined"], "reason": reason}
