"""How often the verdict rule returns the truth, by simulation (no training); the table in docs/verdict.md.

``python -m qkrank.calibration [--studies 4000] [--seed 0]`` prints, for every true pattern (A, B, C,
neither), number of seeds n and SD of the per-seed paired difference, the share of simulated studies
whose verdict is the truth, another determined scenario (an error) or undetermined; then, per pattern
and SD, the planner's n and the share correct at that n.

Model of one study: mode m, seed s gives BASE_PR + effect_m + u_s + e_ms, with a seed effect u_s shared
by the modes (SD SEED_SD: what pairing cancels) and e_ms independent, SD sd/√2, so each paired
difference has SD ``sd``. Patterns (learned, frozen, none): A (+Δ, 0, 0), B (0, 0, −Δ), C (+Δ, 0, −Δ),
neither (0, 0, 0), with Δ = EFFECT PR units (seed 004's gaps are 4–6), and two with a pair near δ.
"""

from __future__ import annotations

import argparse

import numpy as np

from qkrank import stats, verdict

BASE_PR, SEED_SD, EFFECT = 60.0, 0.3, 4.0
# name → (effects of learned, frozen, none; the true scenario). The "near δ" rows put one pair close to the
# margin δ ≈ 1.2 (2% of 60) on either side: the hardest truths for the error bound.
PATTERNS = {"A": ((EFFECT, 0.0, 0.0), "A"), "B": ((0.0, 0.0, -EFFECT), "B"), "C": ((EFFECT, 0.0, -EFFECT), "C"),
            "neither": ((0.0, 0.0, 0.0), "neither"),
            "A, frozen − none = 1.0 (near δ)": ((EFFECT, 1.0, 0.0), "A"),
            "C, frozen − none = 1.6 (near δ)": ((EFFECT, 1.6, 0.0), "C")}
SEEDS = (3, 5, 10)
SDS = (0.25, 0.5, 1.0)
MARGIN, ALPHA, POWER = 0.02, 0.05, 0.8


def simulate(pattern: str, n: int, sd: float, studies: int, rng: np.random.Generator,
             margin: float = MARGIN, alpha: float = ALPHA) -> dict[str, float]:
    """Shares of ``studies`` simulated studies that return the truth, a wrong scenario, or undetermined."""
    effects, truth = PATTERNS[pattern]
    effects = np.asarray(effects)[None, :, None]
    values = (BASE_PR + effects + rng.normal(0, SEED_SD, (studies, 1, n))
              + rng.normal(0, sd / np.sqrt(2), (studies, 3, n)))
    found = verdict.simulate_verdicts(values, margin, alpha)
    undetermined = float(np.mean(found == "undetermined"))
    wrong = float(np.mean((found != truth) & (found != "undetermined")))
    return {"truth": float(np.mean(found == truth)), "wrong": wrong, "undetermined": undetermined}


def planner_n(pattern: str, sd: float, margin: float = MARGIN, alpha: float = ALPHA, power: float = POWER):
    """The planner's seeds for a pattern when the true differences and their SD are known."""
    effects = dict(zip(verdict.VERDICT_MODES, PATTERNS[pattern][0], strict=True))
    pairs = []
    for a, b in verdict.PAIRS:
        delta = margin * (2 * BASE_PR + effects[a] + effects[b]) / 2
        pairs.append((effects[a] - effects[b], sd, delta))
    return stats.study_seeds(pairs, alpha, power)


def table(studies: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The calibration grid and the planner check, from one random generator."""
    rng = np.random.default_rng(seed)
    grid = [{"pattern": p, "n": n, "sd": sd} | simulate(p, n, sd, studies, rng)
            for p in PATTERNS for sd in SDS for n in SEEDS]
    plan = []
    for p in PATTERNS:
        for sd in SDS:
            n = planner_n(p, sd)
            plan.append({"pattern": p, "sd": sd, "planner_n": n}
                        | (simulate(p, n, sd, studies, rng) if n else {}))
    return grid, plan


def markdown(grid: list[dict], plan: list[dict]) -> str:
    from qkrank.markdown import table

    lines = table(["truth", "SD of paired difference", "n", "truth returned", "wrong scenario", "undetermined"],
                  [[r["pattern"], f"{r['sd']:g}", str(r["n"]), f"{r['truth']:.1%}", f"{r['wrong']:.1%}",
                    f"{r['undetermined']:.1%}"] for r in grid])
    lines += [""] + table(["truth", "SD of paired difference", "planner's n", "truth returned at that n",
                           "wrong scenario"],
                          [[r["pattern"], f"{r['sd']:g}", str(r["planner_n"] or f"> {stats.MAX_SEEDS}"),
                            f"{r['truth']:.1%}" if r["planner_n"] else "–",
                            f"{r['wrong']:.1%}" if r["planner_n"] else "–"] for r in plan])
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Calibrate the verdict rule by simulation.")
    parser.add_argument("--studies", type=int, default=4000, help="simulated studies per setting")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    print(markdown(*table(args.studies, args.seed)))


if __name__ == "__main__":
    main()
