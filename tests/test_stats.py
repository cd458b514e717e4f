"""The verdict's statistics against scipy/statsmodels and against simulations with a known truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sstats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

from qkrank import calibration, planner, stats, verdict


def test_paired_tests_equal_ttest_rel_and_statsmodels_ttost_paired():
    rng = np.random.default_rng(3)
    a, b = rng.normal(60, 1, 6), rng.normal(59, 1, 6)
    delta = 1.2
    t = stats.pair_tests(a[None], b[None], np.array([delta]), alpha=0.05, level=0.95)
    rel = sstats.ttest_rel(a, b)
    assert t["p_zero"][0] == pytest.approx(rel.pvalue)
    ci = rel.confidence_interval(0.95)
    assert (t["ci_low"][0], t["ci_high"][0]) == pytest.approx((ci.low, ci.high))
    assert t["p_equivalent"][0] == pytest.approx(ttost_paired(a, b, -delta, delta)[0])
    assert t["estimate"][0] == pytest.approx(np.mean(a - b)) and t["sd"][0] == pytest.approx(np.std(a - b, ddof=1))
    # minimum-effect test: one-sided test of d against the margin on the estimate's side
    side = "greater" if np.mean(a - b) > 0 else "less"
    ref = sstats.ttest_1samp(a - b, delta if side == "greater" else -delta, alternative=side).pvalue
    assert t["p_different"][0] == pytest.approx(ref)


def test_welch_fallback_equals_ttest_ind():
    a, b = np.array([5.0, 5.5, 6.1, 5.7]), np.array([4.0, 4.9, 3.8])
    t = stats.pair_tests(a[None], b[None], np.array([0.5]), 0.05, 0.95, paired=False)
    ref = sstats.ttest_ind(a, b, equal_var=False)
    assert t["p_zero"][0] == pytest.approx(ref.pvalue)
    assert (t["ci_low"][0], t["ci_high"][0]) == pytest.approx(tuple(ref.confidence_interval(0.95)))


def test_holm_equals_statsmodels():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.1, (50, 3))
    ours = stats.holm(p)
    for row, adj in zip(p, ours, strict=True):
        assert adj == pytest.approx(multipletests(row, method="holm")[1])


def test_different_is_rare_when_the_true_difference_is_exactly_the_margin():
    """Minimum-effect test: at |d| = δ a 'different' call is an error; its rate stays under α."""
    rng = np.random.default_rng(7)
    delta, n, studies = 1.0, 5, 20000
    d = delta + rng.normal(0, 0.8, (studies, 1, n))
    t = stats.pair_tests(d, np.zeros_like(d), np.full((studies, 1), delta), 0.05, 0.95)
    relation, _ = stats.decide(t, 0.05)
    assert np.mean(relation == "different") <= 0.05
    assert np.mean(relation == "equivalent") <= 0.05


TIGHT = [-0.1, 0.0, 0.1]


def values(center: float, seeds=(0, 1, 2)) -> dict:
    return {s: center + TIGHT[i % 3] * (1 + 0.3 * (i % 2)) for i, s in enumerate(seeds)}


@pytest.mark.parametrize("learned, frozen, none, expected", [
    (60, 50, 50, "A"), (60, 60, 50, "B"), (66, 59.5, 63, "C"), (50, 50, 50, "neither")])
def test_scenario_from_separated_modes(learned, frozen, none, expected):
    found = verdict.scenario({"learned": values(learned), "frozen": values(frozen), "none": values(none)},
                             0.95, 0.02, 0.05)
    assert found["scenario"] == expected, found["reason"]
    assert all(p["method"] == "paired" for p in found["pairs"])


def test_pairing_resolves_what_unpaired_spread_hides():
    """A large seed effect shared by all modes: paired differences are tight, the per-mode spread is not."""
    seed_effect = {0: -3.0, 1: 0.0, 2: 3.0}
    by_mode = {m: {s: base + e + 0.05 * s for s, e in seed_effect.items()}
               for m, base in (("learned", 66.0), ("frozen", 60.0), ("none", 60.0))}
    found = verdict.scenario(by_mode, 0.95, 0.02, 0.05)
    assert found["scenario"] == "A", found["reason"]


def test_undetermined_with_one_seed_a_missing_mode_or_a_wide_pair():
    one = verdict.scenario({"learned": {0: 60}, "frozen": {0: 50}, "none": {0: 50}}, 0.95, 0.02, 0.05)
    assert one["scenario"] == "undetermined" and "fewer than 2 seeds" in one["reason"]
    missing = verdict.scenario({"learned": values(60), "none": values(50)}, 0.95, 0.02, 0.05)
    assert missing["scenario"] == "undetermined" and "missing frozen" in missing["reason"]
    wide = verdict.scenario({"learned": {0: 55, 1: 65, 2: 60}, "frozen": values(50), "none": values(50)},
                            0.95, 0.02, 0.05)
    assert wide["scenario"] == "undetermined" and wide["pairs"][0]["relation"] == "unresolved"


def test_welch_is_used_and_named_when_seeds_do_not_line_up():
    found = verdict.scenario({"learned": values(60, (0, 1, 2)), "frozen": values(50, (0, 1, 3)),
                              "none": values(50, (0, 1, 2))}, 0.95, 0.02, 0.05)
    methods = [p["method"] for p in found["pairs"]]
    assert methods[0].startswith("Welch") and methods[1] == "paired" and methods[2].startswith("Welch")


def test_planner_seeds_reach_the_power_and_grow_with_the_spread():
    n_small = stats.seeds_needed(3.0, 0.5, 1.2, 0.05 / 3)
    n_big = stats.seeds_needed(3.0, 1.5, 1.2, 0.05 / 3)
    assert 2 <= n_small < n_big
    assert stats.resolve_power(3.0, 1.5, 1.2, n_big, 0.05 / 3) >= 0.8 > stats.resolve_power(3.0, 1.5, 1.2, n_big - 1,
                                                                                               0.05 / 3)
    assert stats.seeds_needed(1.2, 1.0, 1.2, 0.05 / 3) is None, "a difference on the margin is never resolved"
    v = {"pairs": [{"a": "learned", "b": "frozen", "estimate": 3.0, "sd": 1.5, "margin": 1.2,
                    "relation": "unresolved"}]}
    plan = planner.plan(v, 0.05, 0.8, cell_hours=2.0, n_modes=3)
    assert plan["pairs"][0]["gpu_hours"] == pytest.approx(plan["pairs"][0]["seeds"] * 3 * 2.0)
    assert planner.plan(v, 0.05, 0.8, 2.0, 3, sd=0.5)["pairs"][0]["seeds"] < plan["pairs"][0]["seeds"]
    lines = planner.planner_lines(v | {"planner": plan})
    assert lines[0].startswith("to resolve learned vs frozen") and "H100-hours" in lines[0]
    one_seed = {"pairs": [{"a": "learned", "b": "frozen", "estimate": 3.0, "sd": None, "margin": 1.2,
                           "relation": "unresolved"}]}
    one_seed["planner"] = planner.plan(one_seed, 0.05, 0.8, 2.0, 3)
    assert "no spread measured" in planner.planner_lines(one_seed)[0]


def test_calibration_error_bound_and_planner_power():
    """Issue 12 §5: wrong determined verdicts ≤ 5% in every setting; the planner's n gives ≥ 80% correct."""
    grid, plan = calibration.table(studies=1500, seed=12)
    assert len(grid) == len(calibration.PATTERNS) * len(calibration.SEEDS) * len(calibration.SDS)
    for row in grid:
        assert row["wrong"] <= 0.05, row
    for row in plan:
        assert row["planner_n"] is not None and row["truth"] >= 0.8, row
    easy = next(r for r in grid if r["pattern"] == "C" and r["sd"] == 0.25 and r["n"] == 10)
    assert easy["truth"] > 0.95
    near = [r for r in grid if "near" in r["pattern"]]
    assert near and max(r["wrong"] for r in near) > 0, "the near-margin truths exercise the error bound"
