"""The real workflow on a micro config: every expected file, PR consistent with SVD, nothing to redo."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import micro_config, run_snakemake, write_config

from qkrank import config as qconfig
from qkrank.rank import pr


@pytest.fixture(scope="module")
def micro_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("micro_study")
    configfile = write_config(workdir / "micro.yaml", micro_config())
    run_snakemake(workdir, configfile)
    return workdir, configfile, qconfig.load(configfile)


def test_every_expected_file_exists(micro_study):
    workdir, _, cfg = micro_study
    results = workdir / "results"
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


def test_stored_pr_equals_numpy_svd_of_stored_singular_values(micro_study):
    workdir, _, cfg = micro_study
    cell = qconfig.cells(cfg)[0]
    with h5py.File(workdir / "results" / "runs" / cell.id / "probe" / "2048.h5") as f:
        for layer in range(int(f.attrs["n_layers"])):
            group = f[f"layers/{layer}/k/roped"]
            sv = group["sv"][()]
            expected = np.array([s.sum() ** 2 / (s**2).sum() for s in sv])
            np.testing.assert_allclose(group["pr"][()], expected, rtol=1e-12)
            # and the singular values are those of the stored activations
            act = group["act"][()].astype(np.float64)
            np.testing.assert_allclose(group["pr"][()], pr(np.linalg.svd(act, compute_uv=False)), rtol=2e-3)


def test_summary_table_has_one_column_per_mode(micro_study):
    workdir, _, cfg = micro_study
    md = (workdir / "results" / "tables" / "summary_seed004.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Metric"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == cfg["grid"]["modes"]
    summary = pd.read_csv(workdir / "results" / "tables" / "summary_seed004.csv")
    assert set(summary["mode"]) == set(cfg["grid"]["modes"])
    initial = summary[summary.quantity == "initial_mean_pr"].set_index("mode")["mean"]
    head_dim = 128 // 4
    assert ((initial > 1) & (initial <= head_dim)).all()


def test_second_run_has_nothing_to_do(micro_study):
    workdir, configfile, _ = micro_study
    proc = run_snakemake(workdir, configfile, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr
