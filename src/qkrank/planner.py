"""The seeds planner: how many seeds would resolve each pair of modes, and what they cost in GPU-hours.

``qkrank plan-seeds --config results/config.json --results results [--sd 0.2] [--power 0.8]`` reads a
finished study's ``verdict.json`` (per pair: the paired difference, the SD of the per-seed differences
and the margin δ) and prints, per (scale, optimizer): the seeds that give each pair ``power`` to be
resolved (equivalent or different) at its Holm level α/3, the seeds that resolve all three together,
and the training cost of a study with that many seeds (6·N·D estimate of ``qkrank.gpu_hours``, H100).
The observed difference and SD are taken as the truth; ``--sd`` replaces the observed SD.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from qkrank import config as qconfig
from qkrank import stats
from qkrank.settings import StudySettings

DEFAULT_POWER = 0.8


def hours_per_cell(study: StudySettings) -> dict[str, float]:
    """GPU-hours of one training cell per scale (the existing 6·N·D estimate at its default MFU)."""
    from qkrank.gpu_hours import study_rows

    return {r["scale"]: r["gpu_hours_per_cell"] for r in study_rows(study.to_dict())}


def plan(v: dict, alpha: float, power: float, cell_hours: float | None, n_modes: int,
         sd: float | None = None) -> dict:
    """Seeds per pair and for the whole verdict of one verdict entry; cost = seeds × modes × cell_hours."""
    pairs = v.get("pairs", [])
    n_pairs = max(len(pairs), 1)
    per_pair = []
    for p in pairs:
        spread = sd if sd is not None else p.get("sd")
        ok = all(x is not None and math.isfinite(x) for x in (p.get("estimate"), spread, p.get("margin")))
        n = stats.seeds_needed(p["estimate"], spread, p["margin"], alpha / n_pairs, power) if ok else None
        per_pair.append({"a": p["a"], "b": p["b"], "relation": p.get("relation"), "sd": spread, "seeds": n,
                         "gpu_hours": None if n is None or cell_hours is None else n * n_modes * cell_hours})
    ok = pairs and all(x["sd"] is not None and math.isfinite(x["sd"]) for x in per_pair)
    study = stats.study_seeds([(p["estimate"], x["sd"], p["margin"]) for p, x in zip(pairs, per_pair, strict=True)],
                              alpha, power) if ok else None
    return {"power": power, "alpha": alpha, "pairs": per_pair, "seeds": study,
            "gpu_hours": None if study is None or cell_hours is None else study * n_modes * cell_hours}


def _count(n) -> str:
    return f"≈{n} seeds" if n is not None else f"more than {stats.MAX_SEEDS} seeds (or no spread measured)"


def _hours(h) -> str:
    return "" if h is None else f", ≈{h:.3g} H100-hours"


def planner_lines(v: dict) -> list[str]:
    """One sentence per unresolved pair and one for the whole verdict, for the summary and the CLI."""
    p = v.get("planner")
    if not p:
        return []
    if not any(x["sd"] is not None and math.isfinite(x["sd"]) for x in p["pairs"]):
        return ["no spread measured (fewer than two seeds per mode): add seeds (`grid.seeds`), or run "
                "`qkrank plan-seeds --sd SD` with an assumed SD of the per-seed differences"]
    lines = [f"to resolve {x['a']} vs {x['b']} at this spread (SD of the paired difference {x['sd']:.3g}): "
             f"{_count(x['seeds'])}{_hours(x['gpu_hours'])}" for x in p["pairs"]
             if x["relation"] == "unresolved" and x["sd"] is not None and math.isfinite(x["sd"])]
    lines.append(f"all three pairs together with {p['power']:.0%} chance: {_count(p['seeds'])}{_hours(p['gpu_hours'])}")
    return lines


def markdown(verdicts: list[dict]) -> str:
    """Per verdict: a table of the pairs (relation now, SD, seeds needed, H100-hours) and the whole-verdict line."""
    from qkrank.markdown import table

    out = []
    for v in verdicts:
        p = v.get("planner")
        if not p:
            continue
        rows = [[f"{x['a']} − {x['b']}", str(x["relation"]), "–" if x["sd"] is None else f"{x['sd']:.3g}",
                 str(x["seeds"]) if x["seeds"] is not None else f"> {stats.MAX_SEEDS}",
                 "–" if x["gpu_hours"] is None else f"{x['gpu_hours']:.3g}"] for x in p["pairs"]]
        out += [f"**{v['scale']}, {v['optimizer']} — {v['quantity_label']}** (now {v['scenario']}; "
                f"{p['power']:.0%} power per pair at α/{max(len(p['pairs']), 1)} = Holm's strictest step)", "",
                *table(["Pair", "Relation now", "SD of paired difference", "Seeds needed", "H100-hours"], rows), "",
                f"All pairs together: {_count(p['seeds'])}{_hours(p['gpu_hours'])}.", ""]
    return "\n".join(out) if out else "No verdict to plan for.\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Seeds (and GPU-hours) needed to resolve the verdict's pairs.")
    qconfig.add_config_args(parser)
    parser.add_argument("--results", type=Path, help="results directory (default: the config's results_dir)")
    parser.add_argument("--sd", type=float, help="assumed SD of the per-seed paired differences (default: observed)")
    parser.add_argument("--power", type=float, default=DEFAULT_POWER, help="chance of resolving, 0..1")
    args = parser.parse_args(argv)
    if not 0 < args.power < 1:
        parser.error(f"--power {args.power}: give a fraction in (0, 1)")
    if args.sd is not None and args.sd <= 0:
        parser.error(f"--sd {args.sd}: give a positive SD")
    try:
        study = StudySettings.from_dict(qconfig.load_from_args(args))
    except qconfig.ConfigError as e:
        sys.exit(f"qkrank plan-seeds: error: {e}")
    path = (args.results or Path(study.results_dir)) / "verdict.json"
    if not path.exists():
        sys.exit(f"qkrank plan-seeds: error: {path} is missing; run the workflow (aggregate step) first")
    verdicts = json.loads(path.read_text())
    hours = hours_per_cell(study)
    n_modes = len(study.grid.modes)
    for v in verdicts:
        v["planner"] = plan(v, v.get("alpha", 0.05), args.power, hours.get(v["scale"]), n_modes, args.sd)
    print(markdown(verdicts))


if __name__ == "__main__":
    main()
