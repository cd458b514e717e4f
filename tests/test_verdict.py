"""The real workflow on the micro config with three seeds: paired tables, the verdict with paired intervals, the
seeds planner (in the summary and from `qkrank plan-seeds`), and the open analyses' tables and figures.

One study of 9 cells (three modes × three seeds) runs once, in a temporary copy of the project.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest
from conftest import copy_project, env_with_src, micro_config, run_snakemake, write_config

from qkrank.verdict import PAIRS

SEEDS = [0, 1, 2]
NEW_FIGURES = ("paired_effects", "gamma_pr", "gamma_dims", "depth_pr", "weight_pr")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("three_seeds"))
    cfg = micro_config()
    cfg["grid"]["seeds"] = SEEDS
    write_config(root / "micro3.yaml", cfg)
    run_snakemake(root, root / "micro3.yaml", snakefile=root / "Snakefile", timeout=1500)
    return root / "results"


def test_paired_table_pairs_every_mode_on_every_quantity(study):
    paired = pd.read_csv(study / "tables" / "paired.csv")
    assert set(zip(paired.a, paired.b, strict=True)) == set(PAIRS)
    assert (paired.method == "paired").all() and (paired.n_a == len(SEEDS)).all()
    assert set(paired.quantity) >= {"final_mean_pr", "minimum_mean_pr", "final_val_loss", "mean_pr", "val_loss"}
    assert set(paired.dropna(subset=["mark_tokens"]).mark_tokens) == {1024, 2048}
    assert (paired.ci_low <= paired.estimate).all() and (paired.estimate <= paired.ci_high).all()
    assert set(paired.relation) <= {"equivalent", "different", "unresolved"}


def test_verdict_has_paired_intervals_and_a_planner(study):
    verdicts = json.loads((study / "verdict.json").read_text())
    assert [v["quantity"] for v in verdicts] == ["final_mean_pr", "minimum_mean_pr"]
    for v in verdicts:
        assert [(p["a"], p["b"]) for p in v["pairs"]] == list(PAIRS)
        for p in v["pairs"]:
            assert math.isfinite(p["ci_low"]) and math.isfinite(p["ci_high"]) and 0 <= p["p_adjusted"] <= 1
        assert v["planner"]["power"] == 0.8 and len(v["planner"]["pairs"]) == 3
    summary = (study / "summary.md").read_text()
    headline = summary[summary.index("## Verdict"):summary.index("Rule (docs/verdict.md)")]
    assert re.search(r"learned − frozen: [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", headline), headline
    if verdicts[0]["scenario"] == "undetermined":
        assert "Seeds planner:" in headline and "H100-hours" in headline
    for heading in ("Paired differences between modes", "The seeds' open analyses", "Seeds planner"):
        assert f"## {heading}" in summary


def test_open_analyses_tables_and_figures(study):
    tables = study / "tables"
    for name in ("gamma_pr", "gamma_dims", "depth_pr", "gamma_pr_points"):
        frame = pd.read_csv(tables / f"{name}.csv")
        assert len(frame) and (frame.n_seeds == len(SEEDS)).all() if "n_seeds" in frame else len(frame), name
    dims = pd.read_csv(tables / "gamma_dims_per_seed.csv")
    assert dims.energy_share_proj.notna().all(), "the micro study stores activations"
    assert (tables / "weight_spectra.csv").exists()
    for name in NEW_FIGURES:
        assert (study / "figures" / f"{name}.png").stat().st_size > 0
        assert (study / "figures" / f"{name}.pdf").stat().st_size > 0


def test_plan_seeds_command(study):
    def plan(*extra):
        proc = subprocess.run([sys.executable, "-m", "qkrank.cli", "plan-seeds", "--config",
                               str(study / "config.json"), "--results", str(study), *extra],
                              capture_output=True, text=True, env=env_with_src(), timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = plan()
    assert "All pairs together" in out and "learned − frozen" in out
    tight = plan("--sd", "0.01")
    needed = [int(n) for n in re.findall(r"All pairs together: ≈(\d+) seeds", tight)]
    assert needed and all(n <= 10 for n in needed), tight
