"""The real workflow in a copy of the project: summary, self-contained report, and what reruns after an edit.

One micro study runs once per session in a temporary copy (Snakefile, workflow/, src/, config.yaml), so
the tests can edit its plotting modules and config without touching the repository. Every edit is undone
(content and mtime) before the next test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, micro_config, run_snakemake, write_config

from qkrank.figures import FIGURES

OVERRIDDEN_CELL = "tiny/none/muon/seed0"


def rerun_config(**overrides) -> dict:
    """The micro study, smaller still: two modes and two checkpoints (0 and 1024 tokens)."""
    cfg = micro_config(**overrides)
    cfg["grid"]["modes"] = ["learned", "none"]
    cfg["scales"]["tiny"]["train"].update(total_tokens=1024, checkpoint_every_tokens=1024)
    cfg["aggregate"] = {"marks_tokens": [512, 1024]}
    return cfg


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """A copy of the project with the micro study run in it once."""
    root = tmp_path_factory.mktemp("project")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".snakemake", "results")
    shutil.copy2(REPO / "Snakefile", root / "Snakefile")
    shutil.copy2(REPO / "config.yaml", root / "config.yaml")
    for folder in ("workflow", "src"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
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
    assert jobs == Counter({"figure_layer_heatmap": 2, "summary": 1, "all": 1})
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
    expected = Counter({"cell_settings": 1, "train": 1, "probe": 2, "study_config": 1, "aggregate": 1,
                        "summary": 1, "all": 1}) + figure_jobs()
    assert jobs == expected
    run_outputs = re.findall(r"output: (results/runs/\S+)", out)
    assert run_outputs and all(f"/runs/{OVERRIDDEN_CELL}/" in path for path in run_outputs), run_outputs
