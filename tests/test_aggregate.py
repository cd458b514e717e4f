"""Aggregation on synthetic probe files with known spectra: every table against independent numpy/scipy sums."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import micro_config
from scipy import stats

from qkrank import aggregate as agg
from qkrank import collect, tables, verdict
from qkrank import config as qconfig
from qkrank.probe import SCHEMA_VERSION
from qkrank.rank import all_metrics, pr, top_energy_share

HEAD_DIM = 8
HEADS = {"q": 4, "k": 2}
SITES = ("proj", "normed", "roped")


def synthetic_config(modes=("learned", "frozen", "none"), seeds=(0, 1), scales=("tiny",), marks=(600, 2048),
                     n_layers=2, total_tokens=2048, every=512) -> dict:
    """A study config whose cells are never trained: the tests write their probe files and logs."""
    cfg = micro_config()
    cfg["grid"] = {"scales": list(scales), "modes": list(modes), "optimizers": ["muon"], "seeds": list(seeds)}
    base = cfg["scales"]["tiny"]
    base["model"]["n_layers"] = n_layers
    base["train"].update(total_tokens=total_tokens, checkpoint_every_tokens=every)
    cfg["scales"] = {s: base for s in scales}
    cfg["aggregate"] = {"marks_tokens": list(marks), "top_fraction": 0.25}
    return qconfig.load(cfg)


def spectrum(rng, heads: int, shift: float) -> np.ndarray:
    """Descending singular values whose decay (hence PR) moves with ``shift``."""
    decay = np.exp(-np.linspace(0, 1, HEAD_DIM) * (1.0 + shift))[None, :] * rng.uniform(0.8, 1.2, (heads, 1))
    return np.sort(decay * rng.uniform(0.9, 1.1, (heads, HEAD_DIM)), axis=1)[:, ::-1]


def write_probe(path: Path, cell: qconfig.Cell, tokens: int, n_layers: int, rng, shift: float,
                complete: bool = True, layer_slope: float = 0.3, extras: bool = False) -> None:
    """A probe file in the layout qkrank.probe writes (docs/hdf5.md), with chosen spectra and γ.

    ``extras``: also the stored vectors (``act``, sites proj and normed) and the weight spectra group.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update({"scale": cell.scale, "mode": cell.mode, "optimizer": cell.optimizer, "seed": cell.seed,
                        "tokens_seen": tokens, "n_layers": n_layers, "schema_version": SCHEMA_VERSION})
        for layer in range(n_layers):
            for tensor, heads in HEADS.items():
                for site in SITES:
                    sv = spectrum(rng, heads, shift + layer_slope * layer)
                    group = f.create_group(f"layers/{layer}/{tensor}/{site}")
                    group["sv"] = sv
                    group["eig_cov"] = sv**2 / 10
                    for metric, values in all_metrics(sv, sv**2 / 10).items():
                        group[metric] = values
                    if extras and site in ("proj", "normed"):
                        group["act"] = rng.normal(0, np.linspace(0.5, 2, HEAD_DIM), (heads, 16, HEAD_DIM)).astype(
                            np.float16)
                if extras:
                    sv = spectrum(rng, heads, shift)
                    group = f.create_group(f"layers/{layer}/{tensor}/weight")
                    group["sv"] = sv
                    group["eig_cov"] = sv**2 / 10
                    for metric, values in all_metrics(sv, sv**2 / 10).items():
                        group[metric] = values
                if cell.mode != "none":
                    gamma = np.ones(HEAD_DIM) if cell.mode == "frozen" else 1 + 0.1 * rng.standard_normal(HEAD_DIM)
                    f[f"layers/{layer}/gamma_{tensor}"] = gamma
        if complete:
            f.attrs["complete"] = True


MODE_SHIFT = {"learned": 0.0, "frozen": 1.5, "none": 0.8}


def build_study(root: Path, cfg: dict, seed: int = 0, shift_of=None, slope_of=None, extras: bool = False) -> Path:
    """Probe files and metrics.csv for every cell of ``cfg`` under ``root/results``; returns the results dir.

    ``slope_of(tokens)``: how fast the spectrum's decay grows with depth (default 0.3: PR falls with depth).
    """
    results = root / "results"
    rng = np.random.default_rng(seed)
    shift_of = shift_of or (lambda cell, tokens: MODE_SHIFT[cell.mode] + tokens / 4096 + 0.05 * cell.seed)
    for cell in qconfig.cells(cfg):
        settings = qconfig.cell_settings(cfg, cell)
        marks = qconfig.checkpoint_tokens(settings)
        for tokens in marks:
            write_probe(collect.probe_path(results, cell, tokens), cell, tokens, settings["model"]["n_layers"], rng,
                        shift_of(cell, tokens), layer_slope=slope_of(tokens) if slope_of else 0.3, extras=extras)
        step_tokens = qconfig.tokens_per_step(settings["train"])
        rows = [{"tokens_seen": t, "step": t // step_tokens,
                 "train_loss": 6 - t / 1000 + 0.01 * cell.seed if t else np.nan,
                 "val_loss": 6.5 - t / 1000 + 0.02 * cell.seed if t in marks else np.nan}
                for t in range(0, marks[-1] + 1, step_tokens)]
        pd.DataFrame(rows).to_csv(results / "runs" / cell.id / "metrics.csv", index=False)
    return results


@pytest.fixture(scope="module")
def two_seed_study(tmp_path_factory):
    cfg = synthetic_config()
    results = build_study(tmp_path_factory.mktemp("agg"), cfg)
    return cfg, results, agg.aggregate(cfg, results)


def key_pr_of(results: Path, cell, tokens, site="roped") -> np.ndarray:
    """Per layer: PR of each KV head's key singular values, straight from the file with numpy."""
    with h5py.File(collect.probe_path(results, cell, tokens)) as f:
        return np.array([[s.sum() ** 2 / (s**2).sum() for s in f[f"layers/{layer}/k/{site}/sv"][()]]
                         for layer in range(int(f.attrs["n_layers"]))])


def t_bounds(values, level=0.95):
    values = np.asarray(values, dtype=float)
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean(), values.mean() - half, values.mean() + half


def md_rows(md: str) -> list[list[str]]:
    """Cells of every pipe-table row (alignment rows left out), stripped of padding."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    return [r for r in rows if not all(set(c) <= set(":-") for c in r)]


# ------------------------------------------------------------------------------------------ intervals


def test_seed_bands_equal_scipy_t_interval_per_group():
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"g": np.repeat(["a", "b", "c"], [3, 1, 5]), "x": rng.normal(size=9)})
    bands = tables.seed_bands(frame, ["g"], "x", 0.9).set_index("g")
    for g, group in frame.groupby("g"):
        row = bands.loc[g]
        assert row["mean"] == pytest.approx(group.x.mean()) and row.n_seeds == len(group) and row.ci_level == 0.9
        if len(group) < 2:
            assert np.isnan(row.ci_low) and np.isnan(row.ci_high)
        else:
            ref = stats.t.interval(0.9, df=len(group) - 1, loc=group.x.mean(), scale=stats.sem(group.x))
            assert (row.ci_low, row.ci_high) == pytest.approx(ref)


# ------------------------------------------------------------------------------------ reading and marks


def test_depth_layers_default_negative_and_bad():
    assert collect.depth_layers(4, []) == {0: "layer 0 (first)", 2: "layer 2 (middle)", 3: "layer 3 (last)"}
    assert collect.depth_layers(1, []) == {0: "layer 0 (first, middle, last)"}
    assert collect.depth_layers(22, [1, -1]) == {1: "layer 1", 21: "layer 21"}
    with pytest.raises(collect.AggregateError, match=r"aggregate.depths.*-4\.\.-1"):
        collect.depth_layers(4, [4])


def test_nearest_checkpoint_reports_the_closest_and_the_earlier_on_a_tie():
    checkpoints = [0, 512, 1024, 1536, 2048]
    assert tables.nearest_checkpoint(600, checkpoints) == 512
    assert tables.nearest_checkpoint(800, checkpoints) == 1024
    assert tables.nearest_checkpoint(768, checkpoints) == 512
    assert tables.nearest_checkpoint(10**9, checkpoints) == 2048


def test_bad_probe_files_are_named(tmp_path):
    cell = qconfig.Cell("tiny", "learned", "muon", 0)
    path = tmp_path / "0.h5"
    with pytest.raises(collect.AggregateError, match="probe file is missing"):
        collect.read_probe(path, 0.1)
    write_probe(path, cell, 0, 1, np.random.default_rng(0), 0.0, complete=False)
    with pytest.raises(collect.AggregateError, match=f"{path}: incomplete probe file"):
        collect.read_probe(path, 0.1)
    path.write_bytes(b"not an HDF5 file")
    with pytest.raises(collect.AggregateError, match=f"{path}: unreadable HDF5"):
        collect.read_probe(path, 0.1)


def test_read_probe_rows_match_the_file(tmp_path):
    cell = qconfig.Cell("tiny", "learned", "muon", 3)
    path = tmp_path / "512.h5"
    write_probe(path, cell, 512, 3, np.random.default_rng(2), 0.5, extras=True)
    frames = collect.read_probe(path, 0.25, depths=[], spectrum_site="roped")
    probes = frames["probes"]
    assert len(probes) == 3 * (len(SITES) + 1) * sum(HEADS.values())  # + the weight site
    assert (probes.seed == 3).all() and (probes.tokens_seen == 512).all()
    with h5py.File(path) as f:
        sv = f["layers/2/k/normed/sv"][()]
    rows = probes[(probes.layer == 2) & (probes.tensor == "k") & (probes.site == "normed")].sort_values("head")
    np.testing.assert_allclose(rows.pr, pr(sv))
    np.testing.assert_allclose(rows.top_energy_share, [(s[:2] ** 2).sum() / (s**2).sum() for s in sv])
    assert len(frames["gamma"]) == 3 * 2 * HEAD_DIM
    spectra = frames["spectra"]
    assert set(spectra.depth) == {"layer 0 (first)", "layer 1 (middle)", "layer 2 (last)"}
    assert set(spectra.tensor) == {"q", "k"} and spectra.sv_normalized.max() == pytest.approx(1.0)
    assert set(spectra.site) == {"roped", "weight"}
    with h5py.File(path) as f:
        wk = f["layers/1/k/weight/sv"][()]
    rows = spectra.query("site == 'weight' and tensor == 'k' and layer == 1").sort_values(["head", "index"])
    np.testing.assert_allclose(rows.sv, wk.ravel())
    np.testing.assert_allclose(rows.sv_normalized, (wk / wk[:, :1]).ravel())
    assert collect.read_probe(path, 0.25)["spectra"].empty, "spectra only where asked for"


# ----------------------------------------------------------------------------------- whole tables


def test_outputs_are_all_written(two_seed_study):
    _, results, _ = two_seed_study
    for name in agg.OUTPUTS:
        assert (results / name).stat().st_size > 0, name
    assert not list(results.rglob("*.tmp"))


def test_probes_table_is_long_and_complete(two_seed_study):
    cfg, _, tables = two_seed_study
    probes = tables["probes"]
    n_ckpt, n_layers = 5, 2
    assert len(probes) == len(qconfig.cells(cfg)) * n_ckpt * n_layers * len(SITES) * sum(HEADS.values())
    key = ["scale", "mode", "optimizer", "seed", "tokens_seen", "layer", "head", "tensor", "site"]
    assert not probes.duplicated(key).any()
    assert {"pr", "pr_cov", "erank", "stable_rank"} <= set(probes.columns)


def test_seed004_summary_against_numpy(two_seed_study):
    cfg, results, tables = two_seed_study
    summary = tables["summary_seed004"].set_index(["mode", "quantity"])
    for mode in cfg["grid"]["modes"]:
        cells = [c for c in qconfig.cells(cfg) if c.mode == mode]
        checkpoints = qconfig.checkpoint_tokens(qconfig.cell_settings(cfg, cells[0]))
        traj = np.array([[key_pr_of(results, c, t).mean() for t in checkpoints] for c in cells])
        for quantity, per_seed in (("initial_mean_pr", traj[:, 0]), ("minimum_mean_pr", traj.min(axis=1)),
                                   ("final_mean_pr", traj[:, -1])):
            mean, low, high = t_bounds(per_seed)
            row = summary.loc[(mode, quantity)]
            assert (row["mean"], row.ci_low, row.ci_high, row.n_seeds) == pytest.approx((mean, low, high, 2))
        assert summary.loc[(mode, "minimum_mean_pr")].tokens_at_minimum == checkpoints[traj.mean(axis=0).argmin()]
        val = [6.5 - 2.048 + 0.02 * c.seed for c in cells]
        assert summary.loc[(mode, "final_val_loss")]["mean"] == pytest.approx(np.mean(val))
    md = (results / "tables" / "summary_seed004.md").read_text()
    rows = md_rows(md)
    assert rows[0] == ["Metric", "learned", "frozen", "none", "learned − frozen", "learned − none", "frozen − none"]
    assert rows[1][:4] == ["Seeds (n)", "2", "2", "2"]
    assert " ± " in md


def test_marks_and_paradox_use_the_nearest_checkpoint(two_seed_study):
    cfg, results, tables = two_seed_study
    marks = tables["marks_per_seed"]
    assert set(zip(marks.mark_tokens, marks.checkpoint_tokens, strict=True)) == {(600, 512), (2048, 2048)}
    cell = qconfig.cells(cfg)[0]
    row = marks[(marks["mode"] == cell.mode) & (marks.seed == cell.seed) & (marks.mark_tokens == 600)].iloc[0]
    per_layer = key_pr_of(results, cell, 512).mean(axis=1)
    assert row.mean_pr == pytest.approx(per_layer.mean())
    assert (row.layer_pr_min, row.layer_pr_max) == pytest.approx((per_layer.min(), per_layer.max()))
    with h5py.File(collect.probe_path(results, cell, 512)) as f:
        shares = [top_energy_share(f[f"layers/{i}/k/roped/sv"][()], 0.25) for i in range(2)]
    assert row.spectral_concentration == pytest.approx(np.mean(shares))
    assert row.val_loss == pytest.approx(6.5 - 0.512 + 0.02 * cell.seed)
    paradox = (results / "tables" / "paradox.md").read_text()
    assert "600 → 512 (512 tokens)" in paradox and "min / max layer PR (2.05k)" in paradox
    assert "share of σ² in top 25% of dims" in paradox


def test_gamma_cv_frozen_is_exactly_zero_and_learned_matches_numpy(two_seed_study):
    cfg, results, tables = two_seed_study
    cv = tables["gamma_cv"]
    assert (cv[cv["mode"] == "frozen"].gamma_cv == 0.0).all()
    assert "none" not in set(cv["mode"])
    cell = next(c for c in qconfig.cells(cfg) if c.mode == "learned")
    with h5py.File(collect.probe_path(results, cell, 2048)) as f:
        gamma = f["layers/1/gamma_k"][()]
    row = cv[(cv["mode"] == "learned") & (cv.seed == cell.seed) & (cv.tokens_seen == 2048) & (cv.layer == 1)
             & (cv.tensor == "k")]
    assert row.gamma_cv.item() == pytest.approx(gamma.std() / gamma.mean())
    final = tables["gamma_cv_final"]
    assert set(final.tensor) == {"q", "k"} and (final.n_seeds == 2).all()
    md = (results / "tables" / "gamma_cv_final.md").read_text()
    assert "none: no γ" in md and "0.0000" in md


def test_verdict_json_is_the_rule_applied_to_final_key_pr(two_seed_study):
    cfg, results, _ = two_seed_study
    found = json.loads((results / "verdict.json").read_text())
    final = next(v for v in found if v["quantity"] == "final_mean_pr")
    by_mode = {m: {c.seed: key_pr_of(results, c, 2048).mean() for c in qconfig.cells(cfg) if c.mode == m}
               for m in cfg["grid"]["modes"]}
    expected = verdict.scenario(by_mode, 0.95, cfg["aggregate"]["verdict_margin"], cfg["aggregate"]["verdict_alpha"])
    assert final["scenario"] == expected["scenario"] and final["reason"] == expected["reason"]
    assert final["modes"]["learned"]["mean"] == pytest.approx(np.mean(list(by_mode["learned"].values())))
    learned_frozen = final["pairs"][0]
    diffs = [by_mode["learned"][s] - by_mode["frozen"][s] for s in sorted(by_mode["learned"])]
    assert learned_frozen["method"] == "paired" and learned_frozen["estimate"] == pytest.approx(np.mean(diffs))
    assert "planner" in final and final["planner"]["pairs"][0]["sd"] == pytest.approx(np.std(diffs, ddof=1))
    assert {p["relation"] for p in final["pairs"]} <= {"different", "equivalent", "unresolved"}


def test_mean_pr_ci_has_queries_and_keys(two_seed_study):
    _, _, tables = two_seed_study
    bands = tables["mean_pr_ci"]
    assert set(bands.tensor) == {"q", "k"} and (bands.n_seeds == 2).all()
    assert (bands.ci_low < bands["mean"]).all() and (bands["mean"] < bands.ci_high).all()


def test_one_mode_one_seed_study_has_empty_intervals_and_no_gamma(tmp_path):
    cfg = synthetic_config(modes=["none"], seeds=[0], marks=[])
    tables = agg.aggregate(cfg, build_study(tmp_path, cfg))
    assert tables["summary_seed004"].ci_low.isna().all()
    assert tables["gamma"].empty and tables["gamma_cv_final"].empty
    assert set(tables["marks"].mark_tokens) == {2048}, "no marks: the final checkpoint"
    assert tables["verdicts"][0]["scenario"] == "undetermined"
    assert "No mode of this study has γ" in (tmp_path / "results" / "tables" / "gamma_cv_final.md").read_text()


def test_the_command_line_writes_what_aggregate_of_the_config_writes(tmp_path):
    """``main`` types the config once (qkrank.settings.StudySettings); ``aggregate`` given the plain dict agrees."""
    cfg = synthetic_config(modes=["learned", "none"], seeds=[0, 1], marks=[600])
    results = build_study(tmp_path, cfg)
    agg.aggregate(cfg, results)
    written = {p.relative_to(results): p.read_bytes() for p in sorted(results.rglob("*")) if p.is_file()}
    for p in [results / "verdict.json", *(results / "tables").iterdir()]:
        p.unlink()
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(cfg))
    agg.main(["--config", str(config_json), "--results", str(results)])
    assert {p.relative_to(results): p.read_bytes() for p in sorted(results.rglob("*")) if p.is_file()} == written
    with pytest.raises(SystemExit, match=r"qkrank.aggregate: error: config field 'aggregate.ci_lvel'"):
        config_json.write_text(json.dumps(cfg | {"aggregate": cfg["aggregate"] | {"ci_lvel": 0.9}}))
        agg.main(["--config", str(config_json), "--results", str(results)])


def test_default_study_size_aggregates_in_seconds_reading_each_file_once(tmp_path, monkeypatch):
    """3 cells × 13 checkpoints × 4 layers × 3 sites × 2 tensors, as the default config."""
    cfg = synthetic_config(seeds=[0], n_layers=4, total_tokens=6144, every=512, marks=[1536, 3072, 6144])
    results = build_study(tmp_path, cfg)
    opened = []
    real_file = h5py.File
    monkeypatch.setattr(collect.h5py, "File",
                        lambda path, *a, **k: opened.append(Path(path)) or real_file(path, *a, **k))
    start = time.perf_counter()
    agg.aggregate(cfg, results)
    elapsed = time.perf_counter() - start
    assert len(opened) == 3 * 13 and len(set(opened)) == len(opened)
    assert elapsed < 15, f"aggregation took {elapsed:.1f} s"


# ------------------------------------------------------------------------------------------ open analyses


@pytest.fixture(scope="module")
def analyses_study(tmp_path_factory):
    """Three layers, stored vectors and weight spectra; PR rises with depth before 1,024 tokens, falls after."""
    cfg = synthetic_config(n_layers=3)
    results = build_study(tmp_path_factory.mktemp("analyses"), cfg, slope_of=lambda t: -0.5 if t < 1024 else 0.5,
                          extras=True)
    return cfg, results, agg.aggregate(cfg, results)


def test_depth_gradient_and_its_sign_flip(analyses_study):
    _, _, out = analyses_study
    per_seed = out["depth_pr_per_seed"]
    first = per_seed[per_seed.tokens_seen == 0]
    assert (first.spearman_rho == 1).all() and (per_seed[per_seed.tokens_seen >= 1024].spearman_rho == -1).all()
    assert (out["depth_pr"].sign_flip_tokens == 1024).all()


def test_gamma_pr_is_spearman_of_cv_against_layer_pr(analyses_study):
    cfg, results, out = analyses_study
    cell = next(c for c in qconfig.cells(cfg) if c.mode == "learned" and c.seed == 1)
    cv, layer_pr = [], []
    for tokens in qconfig.checkpoint_tokens(qconfig.cell_settings(cfg, cell)):
        with h5py.File(collect.probe_path(results, cell, tokens)) as f:
            for layer in range(3):
                g = f[f"layers/{layer}/gamma_k"][()]
                cv.append(g.std() / g.mean())
                layer_pr.append(f[f"layers/{layer}/k/roped/pr"][()].mean())
    row = out["gamma_pr_per_seed"].query("seed == 1 and tensor == 'k'")
    assert row.spearman_rho.item() == pytest.approx(stats.spearmanr(cv, layer_pr).statistic)
    assert row.n_points.item() == len(cv) and set(out["gamma_pr_per_seed"]["mode"]) == {"learned"}


def test_individual_gamma_overlap_and_energy_share_against_numpy(analyses_study):
    cfg, results, out = analyses_study
    cell = next(c for c in qconfig.cells(cfg) if c.mode == "learned" and c.seed == 0)
    with h5py.File(collect.probe_path(results, cell, 0)) as f0, h5py.File(collect.probe_path(results, cell, 2048)) as f:
        g0, g = f0["layers/2/gamma_q"][()], f["layers/2/gamma_q"][()]
        energy = np.mean(f0["layers/2/q/proj/act"][()].astype(np.float64) ** 2, axis=(0, 1))
    k = HEAD_DIM // 8
    top = set(np.argsort(g)[-k:]) & set(np.argsort(g0)[-k:])
    row = out["gamma_dims_per_seed"].query("seed == 0 and layer == 2 and tensor == 'q' and tokens_seen == 0").iloc[0]
    assert row.k == k and row.top_overlap == pytest.approx(len(top) / k)
    assert row.amplified_fraction == pytest.approx(np.mean(g0 > 1))
    assert row.energy_share_proj == pytest.approx(energy[g0 > 1].sum() / energy.sum())


def test_weight_spectra_are_read_when_present_and_skipped_when_not(analyses_study, two_seed_study):
    cfg, results, out = analyses_study
    weights = out["weight_spectra"].query("tensor == 'k' and metric == 'pr' and layer == 1 and tokens_seen == 512")
    for mode in cfg["grid"]["modes"]:
        per_seed = []
        for cell in (c for c in qconfig.cells(cfg) if c.mode == mode):
            with h5py.File(collect.probe_path(results, cell, 512)) as f:
                per_seed.append(f["layers/1/k/weight/pr"][()].mean())
        assert weights.query("mode == @mode")["mean"].item() == pytest.approx(np.mean(per_seed))
    assert "Not in these probe files" not in (results / "tables" / "analyses.md").read_text()
    assert "weight" not in set(out["mean_pr_ci"].tensor) and set(out["layer_pr"].tensor) == {"q", "k"}
    _, plain_results, plain = two_seed_study
    assert plain["weight_spectra"].empty
    assert "Not in these probe files" in (plain_results / "tables" / "analyses.md").read_text()


def test_paired_table_covers_every_quantity_and_mark(two_seed_study):
    cfg, results, out = two_seed_study
    paired = out["paired"]
    assert set(zip(paired.a, paired.b, strict=True)) == {("learned", "frozen"), ("learned", "none"), ("frozen", "none")}
    marks = paired.dropna(subset=["mark_tokens"])
    assert set(marks.quantity) == {"val_loss", "mean_pr"} and set(marks.mark_tokens) == {600, 2048}
    assert set(paired[paired.mark_tokens.isna()].quantity) >= {"final_mean_pr", "minimum_mean_pr", "final_val_loss"}
    assert (paired.method == "paired").all() and (paired.n_a == 2).all()
    per_seed = out["summary_seed004_per_seed"].set_index(["mode", "seed"]).final_val_loss
    row = paired.query("quantity == 'final_val_loss' and a == 'learned' and b == 'none'").iloc[0]
    assert row.estimate == pytest.approx(np.mean([per_seed["learned", s] - per_seed["none", s] for s in (0, 1)]))
    md = md_rows((results / "tables" / "summary_seed004.md").read_text())
    final = next(r for r in md if r[0] == "Final mean PR")
    assert re.fullmatch(r"[+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] [≈≠?]", final[4]), final
