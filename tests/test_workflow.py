"""The real workflow on the micro config, in a copy of the project: every expected file, PR consistent with
numpy's SVD, the summary and the self-contained report, nothing to redo, and what reruns after an edit.

One micro study (three modes, a few thousand tokens per cell) runs once per session in a temporary copy
(Snakefile, workflow/, src/, config.yaml), so the tests can edit its plotting modules and config without
touching the repository. Every edit is undone (content and mtime) before the next test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import copy_project, env_with_src, micro_config, run_snakemake, write_config

from qkrank import config as qconfig
from qkrank.figures import FIGURES
from qkrank.rank import pr

OVERRIDDEN_CELL = "tiny/none/muon/seed0"


def rerun_config(**overrides) -> dict:
    """The micro study: three modes, checkpoints every 512 of 2,048 tokens."""
    return micro_config(**overrides)


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """A copy of the project with the micro study run in it once."""
    root = copy_project(tmp_path_factory.mktemp("project"))
    write_config(root / "micro.yaml", rerun_config())
    run_snakemake(root, root / "micro.yaml", snakefile=root / "Snakefile")
    return root


def dry_run(project: Path, configfile: str = "micro.yaml") -> tuple[Counter, str]:
    """Jobs ``snakemake -n`` would run, by rule (from its job stats table), and its whole output."""
    proc = run_snakemake(project, project / configfile, "-n", snakefile=project / "Snakefile")
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return Counter(), out
    lines = out[out.index("Job stats:"):].splitlines()[3:]  # skip the title, header and dashes
    jobs = Counter()
    for line in lines:
        name, count = line.split()
        if name == "total":
            break
        jobs[name] = int(count)
    return jobs, out


@contextlib.contextmanager
def edited(path: Path, text: str = "\n# an edit\n"):
    """Append to a file (its mtime becomes newer than every output); restore content and mtime afterwards."""
    original, stat = path.read_bytes(), path.stat()
    try:
        path.write_bytes(original + text.encode())
        later = time.time() + 1
        os.utime(path, (later, later))
        yield path
    finally:
        path.write_bytes(original)
        os.utime(path, (stat.st_atime, stat.st_mtime))


def test_every_expected_file_exists(project):
    cfg = qconfig.load(project / "micro.yaml")
    results = project / "results"
    for name in ("tokenizer.json", "train.bin", "val.bin", "manifest.json"):
        assert (results / "data" / name).stat().st_size > 0
    for cell in qconfig.cells(cfg):
        run = results / "runs" / cell.id
        assert (run / "metrics.csv").exists() and (run / "train.json").exists()
        assert not (run / "resume").exists(), "resume state is removed once a cell finishes"
        for tokens in qconfig.checkpoint_tokens(qconfig.cell_settings(cfg, cell)):
            assert (run / "probe" / f"{tokens}.h5").exists()
    for name in ("probes.csv", "losses.csv", "mean_pr.csv", "summary_seed004.csv", "summary_seed004.md"):
        assert (results / "tables" / name).exists()
    for name in ("pr_trajectory", "loss"):
        assert (results / "figures" / f"{name}.png").stat().st_size > 10_000
        assert (results / "figures" / f"{name}.pdf").exists()
    assert (results / "summary.md").exists()
    assert not list(results.rglob("*.tmp")), "no temporary file may be left behind"


def test_stored_pr_equals_numpy_svd_of_stored_singular_values(project):
    cfg = qconfig.load(project / "micro.yaml")
    cell = qconfig.cells(cfg)[0]
    with h5py.File(project / "results" / "runs" / cell.id / "probe" / "2048.h5") as f:
        for layer in range(int(f.attrs["n_layers"])):
            group = f[f"layers/{layer}/k/roped"]
            sv = group["sv"][()]
            expected = np.array([s.sum() ** 2 / (s**2).sum() for s in sv])
            np.testing.assert_allclose(group["pr"][()], expected, rtol=1e-12)
            # and the singular values are those of the stored activations
            act = group["act"][()].astype(np.float64)
            np.testing.assert_allclose(group["pr"][()], pr(np.linalg.svd(act, compute_uv=False)), rtol=2e-3)


def test_summary_table_has_one_column_per_mode(project):
    cfg = qconfig.load(project / "micro.yaml")
    md = (project / "results" / "tables" / "summary_seed004.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Metric"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == cfg["grid"]["modes"]
    summary = pd.read_csv(project / "results" / "tables" / "summary_seed004.csv")
    assert set(summary["mode"]) == set(cfg["grid"]["modes"])
    initial = summary[summary.quantity == "initial_mean_pr"].set_index("mode")["mean"]
    head_dim = 128 // 4
    assert ((initial > 1) & (initial <= head_dim)).all()


def test_second_run_has_nothing_to_do(project):
    jobs, out = dry_run(project)
    assert not jobs and "Nothing to be done" in out, out[-2000:]


def figure_jobs() -> Counter:
    """Figure jobs of the rerun config: one per figure, one per mode for per-mode figures."""
    modes = rerun_config()["grid"]["modes"]
    return Counter({f"figure_{name}": len([m for m in modes if m in spec["per_mode"]]) if "per_mode" in spec else 1
                    for name, spec in FIGURES.items()})


def test_summary_has_the_verdict_every_table_and_every_figure(project):
    results = project / "results"
    summary = (results / "summary.md").read_text()
    assert "## Verdict (seed 004 §2)" in summary and "Undetermined" in summary, "one seed: no verdict"
    for heading in ("Seed 004 §3.1 summary", "Seed 000 token marks", "paradox", "γ coefficient of variation",
                    "Mean query and key PR"):
        assert heading in summary
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", summary)
    assert len(links) == sum(figure_jobs().values())
    for link in links:
        assert (results / link).is_file() and (results / link).with_suffix(".pdf").is_file(), link
    assert (results / "verdict.json").is_file()


def test_report_is_self_contained_with_every_figure(project):
    run_snakemake(project, project / "micro.yaml", "--report", "results/report.html", snakefile=project / "Snakefile")
    html = (project / "results" / "report.html").read_text()
    assert not re.search(r"<script[^>]+src=", html) and not re.search(r"<link[^>]+href=\"https?:", html)
    for png in (project / "results" / "figures").rglob("*.png"):
        assert base64.b64encode(png.read_bytes()[:300])[:200].decode() in html, f"{png} is not embedded"
    for category in [spec["category"] for spec in FIGURES.values()] + ["0 · Summary and verdict", "7 · Tables"]:
        assert json.dumps(category) in html, f"report category {category} missing"
    assert '"mode": "none"' in html and '"scale": "tiny"' in html, "per-mode figures carry labels"
    assert "caption" in html and "participation ratio" in html


def test_editing_one_plotting_module_reruns_only_its_figure(project):
    with edited(project / "src" / "qkrank" / "figures" / "spectral_decay.py"):
        jobs, _ = dry_run(project)
    assert jobs == Counter({"figure_spectral_decay": 1, "summary": 1, "all": 1})
    # A per-mode figure: its job for every mode, nothing else.
    with edited(project / "src" / "qkrank" / "figures" / "layer_heatmap.py"):
        jobs, out = dry_run(project)
    assert jobs == Counter({"figure_layer_heatmap": len(rerun_config()["grid"]["modes"]), "summary": 1, "all": 1})
    assert "reason: Updated input files:" in out and "layer_heatmap.py" in out


def test_editing_style_redraws_every_figure_and_model_code_retrains_nothing(project):
    with edited(project / "src" / "qkrank" / "figures" / "style.py"):
        jobs, _ = dry_run(project)
    assert jobs == figure_jobs() + Counter({"summary": 1, "all": 1})
    with edited(project / "src" / "qkrank" / "model.py"), edited(project / "src" / "qkrank" / "train.py"):
        jobs, out = dry_run(project)
    assert jobs == Counter(), out[-2000:]


def test_changing_one_cells_config_reruns_only_that_cell(project):
    cfg = rerun_config(cell_overrides={OVERRIDDEN_CELL: {"optim": {"adamw": {"lr": 0.001}}}})
    write_config(project / "override.yaml", cfg)
    jobs, out = dry_run(project, "override.yaml")
    settings = qconfig.cell_settings(qconfig.load(cfg), qconfig.Cell.parse(OVERRIDDEN_CELL))
    n_probes = len(qconfig.checkpoint_tokens(settings))
    # the cell trains again segment by segment: one `segment` job per snapshot point but the last (`train`)
    expected = Counter({"cell_settings": 1, "segment": n_probes - 1, "train": 1, "probe": n_probes,
                        "study_config": 1, "aggregate": 1, "summary": 1, "all": 1}) + figure_jobs()
    assert jobs == expected
    run_outputs = re.findall(r"output: (results/runs/\S+)", out)
    assert run_outputs and all(f"/runs/{OVERRIDDEN_CELL}/" in path for path in run_outputs), run_outputs


def test_lint_is_clean_and_building_the_dag_imports_no_heavy_library(project):
    lint = run_snakemake(project, project / "micro.yaml", "--lint", snakefile=project / "Snakefile")
    assert "Congratulations, your workflow is in a good condition!" in lint.stdout + lint.stderr, lint.stdout[-3000:]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "snakemake", "-n", "--configfile", "micro.yaml"],
                          cwd=project, capture_output=True, text=True, env=env_with_src(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    # pandas is left out: with finished outputs Snakemake's own params serializer imports it (persistence).
    heavy = {"torch", "scipy", "h5py", "matplotlib"}
    assert not imported & heavy, sorted(imported & heavy)
