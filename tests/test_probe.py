"""Probe files of real micro runs: layout per mode, γ, act vs stored metrics, batch identity, truncation."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest
import torch
from conftest import env_with_src, micro_config, run_snakemake, write_config

from qkrank import checkpoint
from qkrank import config as qconfig
from qkrank.data import TokenShards, sha256_file
from qkrank.model import GPT, PRESETS, SITES, TENSORS, ModelConfig
from qkrank.probe import (
    SCHEMA_VERSION,
    ProbeError,
    ProbeWarning,
    batch_hash,
    is_complete_probe_file,
    main,
    measure,
    probe_batch,
    probe_file_problem,
    probe_snapshot,
    saves_activations,
    small_batch_message,
)
from qkrank.rank import METRICS, pr
from qkrank.settings import ProbeSettings

ROOT_ATTRS = ("scale", "mode", "optimizer", "seed", "tokens_seen", "step", "config_hash", "probe_batch_hash",
              "qkrank_version", "schema_version", "n_probe_tokens", "complete")


def cell_probe_batch(data, settings: dict) -> np.ndarray:
    """The probe batch of a cell (its settings as a mapping) from the token shards in ``data``."""
    return probe_batch(TokenShards(data), ProbeSettings.from_dict(settings["probe"]), settings["train"]["seq_len"])


@pytest.fixture(scope="module")
def study(micro_data, tmp_path_factory):
    """Every mode of the micro config trained, and every snapshot probed: {mode: (settings, run_dir)}."""
    from qkrank.train import train_cell

    root = tmp_path_factory.mktemp("probe_study")
    cfg = qconfig.load(micro_config())
    runs = {}
    for cell in qconfig.cells(cfg):
        settings = qconfig.cell_settings(cfg, cell)
        run = root / "runs" / cell.id
        train_cell(settings, micro_data, run)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProbeWarning)  # the micro batch is deliberately small
            for tokens in qconfig.checkpoint_tokens(settings):
                probe_snapshot(settings, micro_data, run, tokens, run / "probe" / f"{tokens}.h5")
        runs[cell.mode] = (settings, run)
    return runs


def _files(run):
    return sorted((run / "probe").glob("*.h5"), key=lambda p: int(p.stem))


def _model(run, tokens: int) -> GPT:
    snap = checkpoint.safe_load(run / "snapshots" / f"{tokens}.pt")
    model = GPT(ModelConfig(**snap["model_config"]))
    model.load_state_dict(snap["model"])
    return model.eval()


@pytest.mark.parametrize("mode", ["learned", "frozen", "none"])
def test_every_dataset_is_present_with_its_shape(study, mode):
    settings, run = study[mode]
    cfg = _model(run, 0).cfg
    n_tokens = settings["probe"]["n_sequences"] * settings["train"]["seq_len"]
    files = _files(run)
    assert [int(p.stem) for p in files] == qconfig.checkpoint_tokens(settings)
    for path in files:
        with h5py.File(path) as f:
            assert all(name in f.attrs for name in ROOT_ATTRS)
            assert (f.attrs["mode"], f.attrs["tokens_seen"]) == (mode, int(path.stem))
            assert f.attrs["n_probe_tokens"] == n_tokens and f.attrs["activations_saved"]
            assert f.attrs["schema_version"] == SCHEMA_VERSION
            assert sorted(f["layers"]) == [str(i) for i in range(cfg.n_layers)]
            for layer in range(cfg.n_layers):
                for tensor, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
                    for site in SITES:
                        group = f[f"layers/{layer}/{tensor}/{site}"]
                        assert set(group) == {"sv", "eig_cov", "act", "pr_seq", "pr_seq_each", *METRICS}
                        assert group["pr"].attrs["n"] == n_tokens == f.attrs["pr_n"]
                        assert group["pr_seq"].attrs["n"] == settings["train"]["seq_len"] == f.attrs["pr_seq_n"]
                        assert group["pr_seq_each"].shape == (settings["probe"]["n_sequences"], heads)
                        for name in ("sv", "eig_cov"):
                            values = group[name][()]
                            assert values.shape == (heads, cfg.head_dim) and values.dtype == np.float64
                            assert np.all(np.diff(values, axis=1) <= 0), f"{name} must be descending"
                        for metric in METRICS:
                            assert group[metric].shape == (heads,) and group[metric].dtype == np.float64
                    weight = f[f"layers/{layer}/{tensor}/weight"]
                    assert set(weight) == {"sv", "eig_cov", *METRICS} and weight.attrs["n"] == cfg.d_model
                    assert weight["sv"].shape == (heads, cfg.head_dim) and weight["pr"].shape == (heads,)
                    for site in SITES:
                        act = f[f"layers/{layer}/{tensor}/{site}/act"]
                        assert act.shape == (heads, n_tokens, cfg.head_dim) and act.dtype == np.float16
                        assert act.compression == "gzip"
                gammas = {t: f.get(f"layers/{layer}/gamma_{t}") for t in TENSORS}
                if mode == "none":
                    assert all(g is None for g in gammas.values())
                else:
                    assert all(g is not None and g.shape == (cfg.head_dim,) for g in gammas.values())


def test_frozen_gamma_is_exactly_one_in_every_file_and_learned_gamma_moves(study):
    for path in _files(study["frozen"][1]):
        with h5py.File(path) as f:
            for layer in range(int(f.attrs["n_layers"])):
                for tensor in TENSORS:
                    assert np.array_equal(f[f"layers/{layer}/gamma_{tensor}"][()], np.ones(int(f.attrs["head_dim"])))
    with h5py.File(_files(study["learned"][1])[-1]) as f:
        assert not np.array_equal(f["layers/0/gamma_k"][()], np.ones(int(f.attrs["head_dim"])))


def _pr_bounds_from_float16(act: np.ndarray) -> tuple[float, float]:
    """Interval certain to hold pr of the float32 vectors that ``act`` (float16) rounds.

    Round-to-nearest float16 gives |E| ≤ u|X| + η entrywise (u = 2⁻¹¹, η = 2⁻²⁵ for subnormals), so
    ‖E‖₂ ≤ ‖|E|‖₂ ≤ u/(1−u)·‖|X̂|‖₂ + η√(nd) = ε, and by Weyl every σ moves by at most ε. pr = (Σσ)²/Σσ² then
    lies between (Σσ̂ − dε)²/Σ(σ̂+ε)² and (Σσ̂ + dε)²/Σmax(σ̂−ε, 0)².
    """
    x = act.astype(np.float64)
    u, eta = 2.0**-11, 2.0**-25
    eps = u / (1 - u) * np.linalg.norm(np.abs(x), 2) + eta * np.sqrt(x.size)
    sv = np.linalg.svd(x, compute_uv=False)
    d = len(sv)
    low = max(sv.sum() - d * eps, 0) ** 2 / ((sv + eps) ** 2).sum()
    high = (sv.sum() + d * eps) ** 2 / (np.clip(sv - eps, 0, None) ** 2).sum()
    return low, high


def test_pr_recomputed_from_act_with_numpy_svd_equals_stored_pr(study):
    for mode in ("learned", "none"):
        with h5py.File(_files(study[mode][1])[-1]) as f:
            for layer in range(int(f.attrs["n_layers"])):
                for tensor in TENSORS:
                    for site in SITES:
                        group = f[f"layers/{layer}/{tensor}/{site}"]
                        act, stored = group["act"][()], group["pr"][()]
                        for head in range(act.shape[0]):
                            recomputed = pr(np.linalg.svd(act[head].astype(np.float64), compute_uv=False))
                            low, high = _pr_bounds_from_float16(act[head])
                            assert low <= stored[head] <= high
                            # In practice rounding errors average out: each σ moves by uᵢᵀEvᵢ, a sum of n·d
                            # independent errors, ~2⁻¹¹/√(3n) ≈ 2e-5 relative at n = 256; 1e-4 is 5× above that.
                            assert recomputed == pytest.approx(stored[head], rel=1e-4)


def _captured_sites(model, windows: np.ndarray) -> dict:
    """The model's vectors at every site for a batch of token windows (model.capture)."""
    with torch.no_grad(), model.capture() as captured:
        model(torch.from_numpy(windows))
    return captured


def test_per_sequence_pr_is_the_mean_of_each_sequences_numpy_pr(study, micro_data):
    settings, run = study["learned"]
    model = _model(run, 2048)
    captured = _captured_sites(model, cell_probe_batch(micro_data, settings))
    with h5py.File(run / "probe" / "2048.h5") as f:
        for layer in range(model.cfg.n_layers):
            for tensor in TENSORS:
                for site in SITES:
                    value = captured[f"layer.{layer}/{tensor}/{site}"].double().numpy()  # (B, heads, T, d)
                    each = np.array([[pr(np.linalg.svd(value[b, h], compute_uv=False)) for h in range(value.shape[1])]
                                     for b in range(value.shape[0])])
                    group = f[f"layers/{layer}/{tensor}/{site}"]
                    np.testing.assert_allclose(group["pr_seq_each"][()], each, rtol=1e-9)
                    np.testing.assert_allclose(group["pr_seq"][()], each.mean(0), rtol=1e-9)
                    # n = 64 vectors per sequence against n = 256 pooled: the per-sequence PR is the smaller
                    assert np.all(group["pr_seq"][()] < group["pr"][()])


def test_weight_spectra_are_numpy_svds_of_each_heads_projection_block(study):
    for mode in ("learned", "none"):
        _, run = study[mode]
        for tokens in (0, 2048):
            model = _model(run, tokens)
            hd = model.cfg.head_dim
            with h5py.File(run / "probe" / f"{tokens}.h5") as f:
                for layer, block in enumerate(model.blocks):
                    for tensor, weight in (("q", block.attn.q_proj.weight), ("k", block.attn.k_proj.weight)):
                        w = weight.detach().double().numpy()
                        group = f[f"layers/{layer}/{tensor}/weight"]
                        for head in range(w.shape[0] // hd):
                            block_h = w[head * hd:(head + 1) * hd]  # (d, d_model)
                            sv = np.linalg.svd(block_h, compute_uv=False)
                            cols = block_h.T - block_h.T.mean(0)
                            eig = np.sort(np.linalg.eigvalsh(cols.T @ cols / (len(cols) - 1)))[::-1]
                            np.testing.assert_allclose(group["sv"][head], sv, rtol=1e-9)
                            np.testing.assert_allclose(group["eig_cov"][head], eig, rtol=1e-8, atol=1e-15)
                            assert group["pr"][head] == pytest.approx(pr(sv), rel=1e-9)


def test_act_holds_the_vectors_the_model_computes_in_token_order(study, micro_data):
    settings, run = study["learned"]
    model = _model(run, 2048)
    captured = _captured_sites(model, cell_probe_batch(micro_data, settings))
    with h5py.File(run / "probe" / "2048.h5") as f:
        for name, tensor_site in (("layer.1/k/roped", "1/k/roped"), ("layer.0/q/normed", "0/q/normed")):
            value = captured[name]  # (B, heads, T, d) → (heads, B·T, d), sequence-major
            expected = value.transpose(0, 1).reshape(value.shape[1], -1, value.shape[-1]).to(torch.float16)
            assert np.array_equal(f[f"layers/{tensor_site}/act"][()], expected.numpy())


def test_probe_batch_is_identical_across_checkpoints_and_modes(study, micro_data):
    settings = study["learned"][0]
    expected = batch_hash(cell_probe_batch(micro_data, settings))
    hashes = set()
    for _, run in study.values():
        for path in _files(run):
            with h5py.File(path) as f:
                hashes.add(f.attrs["probe_batch_hash"])
    assert hashes == {expected}
    other = batch_hash(probe_batch(TokenShards(micro_data), dataclasses.replace(
        ProbeSettings.from_dict(settings["probe"]), n_sequences=5, seq_len=None), 64))
    assert other != expected


def test_probing_does_not_change_the_model_output(study, micro_data):
    for mode, (settings, run) in study.items():
        model = _model(run, 2048)
        windows = cell_probe_batch(micro_data, settings)
        x = torch.from_numpy(windows)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            plain = model(x)
            with model.capture():
                captured = model(x)
        measure(model, windows, 3, torch.device("cpu"))
        with torch.no_grad():
            after = model(x)
        assert torch.equal(plain, captured) and torch.equal(plain, after), mode
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), mode


def test_chunk_size_does_not_change_the_stored_spectra(study, micro_data, tmp_path):
    settings, run = study["none"]
    settings = json.loads(json.dumps(settings))
    settings["probe"].update(chunk_sequences=1, save_activations=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbeWarning)
        probe_snapshot(settings, micro_data, run, 2048, tmp_path / "one.h5")
    with h5py.File(tmp_path / "one.h5") as one, h5py.File(run / "probe" / "2048.h5") as four:
        assert not one.attrs["activations_saved"] and "act" not in one["layers/0/k/roped"]
        for site in SITES:
            name = f"layers/1/q/{site}/sv"
            np.testing.assert_allclose(one[name][()], four[name][()], rtol=1e-9)


def test_small_probe_batch_warns(study, micro_data, tmp_path):
    settings, run = study["frozen"]
    with pytest.warns(ProbeWarning, match=r"256 tokens per head, fewer than 16 × head_dim = 512"):
        probe_snapshot(settings, micro_data, run, 0, tmp_path / "0.h5")
    assert small_batch_message(512, 32) is None and small_batch_message(511, 32) is not None


def test_probe_batch_larger_than_the_val_split_warns(study, micro_data, tmp_path):
    settings, run = study["none"]
    settings = json.loads(json.dumps(settings))
    val_tokens = len(TokenShards(micro_data).splits["val"])
    settings["probe"].update(seq_len=256, n_sequences=val_tokens // 256 + 1, save_activations=False)
    with pytest.warns(ProbeWarning, match="windows overlap"):
        probe_snapshot(settings, micro_data, run, 0, tmp_path / "0.h5")


def test_save_activations_auto_keeps_them_for_tiny_only():
    assert saves_activations("auto", PRESETS["tiny"], 8 * 256)
    assert not saves_activations("auto", PRESETS["88m"], 8 * 256)
    assert not saves_activations("auto", PRESETS["1.5b"], 8 * 2048)
    assert saves_activations(True, PRESETS["1.5b"], 8 * 2048) and not saves_activations(False, PRESETS["tiny"], 8)


@pytest.mark.parametrize("damage", ["half", "last_byte", "no_complete", "old_schema", "missing"])
def test_a_damaged_probe_file_is_detected_and_named(study, tmp_path, damage):
    path = tmp_path / "probe" / "2048.h5"
    path.parent.mkdir()
    shutil.copy(study["learned"][1] / "probe" / "2048.h5", path)
    assert is_complete_probe_file(path) and probe_file_problem(path) is None
    if damage in ("half", "last_byte"):
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2 if damage == "half" else size - 1)
    elif damage in ("no_complete", "old_schema"):
        with h5py.File(path, "a") as f:
            if damage == "no_complete":
                del f.attrs["complete"]
            else:
                f.attrs["schema_version"] = SCHEMA_VERSION - 1
    else:
        path.unlink()
    assert not is_complete_probe_file(path)
    problem = probe_file_problem(path)
    assert problem.startswith(f"{path}: ")
    expected = {"half": "truncated", "last_byte": "truncated", "no_complete": "incomplete",
                "old_schema": "schema version", "missing": "missing"}[damage]
    assert expected in problem


def test_cli_names_a_missing_snapshot_and_valid_ones(study, micro_data, tmp_path):
    settings, run = study["learned"]
    settings_path = tmp_path / "settings.json"
    settings_path.write_text(json.dumps(settings))
    with pytest.raises(SystemExit) as exit_info:
        main(["--settings", str(settings_path), "--data", str(micro_data), "--run-dir", str(run),
              "--tokens", "700", "--out", str(tmp_path / "700.h5")])
    message = str(exit_info.value)
    assert "train.json: no snapshot at 700 tokens" in message and "[0, 512, 1024, 1536, 2048]" in message
    assert not (tmp_path / "700.h5").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_cuda_probe_device_without_cuda_names_the_field(study, micro_data, tmp_path):
    settings, run = study["learned"]
    settings = json.loads(json.dumps(settings))
    settings["probe"]["device"] = "cuda"
    with pytest.raises(ProbeError, match="probe.device"):
        probe_snapshot(settings, micro_data, run, 0, tmp_path / "0.h5")


@pytest.mark.slow
def test_workflow_reprobes_a_truncated_probe_file(micro_data, tmp_path):
    """Nothing is deleted while the DAG is built (issue 14): `qkrank verify --fix` removes the damaged file."""
    cfg = micro_config()
    cfg["grid"]["modes"] = ["learned"]
    cfg["scales"]["tiny"]["train"].update(total_tokens=1024, checkpoint_every_tokens=512)
    cfg["scales"]["tiny"]["train"]["keep_snapshots"] = "all"  # re-probing needs the snapshot (or retraining)
    configfile = write_config(tmp_path / "micro.yaml", cfg)
    shutil.copytree(micro_data, tmp_path / "results" / "data")  # same data section: saves tokenizer training
    target = "results/runs/tiny/learned/muon/seed0/probe/512.h5"
    first = run_snakemake(tmp_path, configfile, target)
    # keep_snapshots: all frees nothing, so the cell is one training job
    assert "rule train:" in first.stderr and "rule segment:" not in first.stderr and "rule data:" not in first.stderr
    damaged = tmp_path / target
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size // 2)
    assert not is_complete_probe_file(damaged)
    fixed = subprocess.run([sys.executable, "-m", "qkrank.verify", "--results", str(tmp_path / "results"), "--fix"],
                           capture_output=True, text=True, env=env_with_src())
    assert fixed.returncode == 0 and f"deleted {damaged}" in fixed.stdout, fixed.stdout + fixed.stderr
    second = run_snakemake(tmp_path, configfile, target)
    log = second.stdout + second.stderr
    assert is_complete_probe_file(damaged), log
    assert "rule probe:" in log and "rule train:" not in log and "rule data:" not in log, log


@pytest.mark.slow
def test_workflow_frees_each_snapshot_once_probed_and_keeps_the_final_one(micro_data, tmp_path):
    """Segments train the cell, each snapshot is a temp() output deleted once its probe file is complete."""
    cfg = micro_config()
    cfg["grid"]["modes"] = ["learned", "none"]
    cfg["cell_overrides"] = {"tiny/none/muon/seed0": {"train": {"keep_snapshots": [512]}}}
    configfile = write_config(tmp_path / "micro.yaml", cfg)
    shutil.copytree(micro_data, tmp_path / "results" / "data")
    runs = {mode: tmp_path / "results" / "runs" / "tiny" / mode / "muon" / "seed0" for mode in ("learned", "none")}
    marks = [0, 512, 1024, 1536, 2048]
    targets = [str(run.relative_to(tmp_path) / "probe" / f"{t}.h5") for run in runs.values() for t in marks]
    first = run_snakemake(tmp_path, configfile, *targets)
    log = first.stdout + first.stderr
    assert "rule segment:" in log and "rule data:" not in log
    for mode, run in runs.items():
        assert all(is_complete_probe_file(run / "probe" / f"{t}.h5") for t in marks), mode
        kept = sorted(int(p.stem) for p in (run / "snapshots").glob("*.pt"))
        assert kept == ([2048] if mode == "learned" else [512, 2048]), mode
        assert not list((run / "snapshots" / "temp").glob("*.pt")), "every freed snapshot is gone"
        manifest = json.loads((run / "train.json").read_text())
        assert sorted(map(int, manifest["snapshots"])) == kept
        assert sorted(map(int, manifest["freed_snapshots"])) == sorted(set(marks) - set(kept))
    # the segments, resumed one from the next, train exactly the weights of one uninterrupted run
    settings = qconfig.cell_settings(qconfig.load(cfg), qconfig.Cell.parse("tiny/learned/muon/seed0"))
    from qkrank.train import train_cell

    whole = tmp_path / "whole"
    train_cell(settings, micro_data, whole)
    segmented = checkpoint.safe_load(runs["learned"] / "snapshots" / "2048.pt")["model"]
    reference = checkpoint.safe_load(whole / "snapshots" / "2048.pt")["model"]
    assert all(torch.equal(segmented[k], reference[k]) for k in reference)
    with h5py.File(runs["learned"] / "probe" / "1024.h5") as a, h5py.File(runs["none"] / "probe" / "1024.h5") as b:
        assert a.attrs["tokens_seen"] == b.attrs["tokens_seen"] == 1024

    second = run_snakemake(tmp_path, configfile, *targets)
    assert "Nothing to be done" in second.stdout + second.stderr
    # re-probing a freed snapshot fails, saying how to retrain the cell, and trains nothing by itself
    for force in (targets[1], "probe"):
        forced = run_snakemake(tmp_path, configfile, *targets, "--forcerun", force, check=False)
        message = forced.stdout + forced.stderr
        freed = "512" if force == targets[1] else r"[\d,]+"  # the rule: whichever freed snapshot comes first
        assert re.search(fr"the snapshot at {freed} tokens was deleted once its probe file was complete", message), \
            message[-3000:]
        assert re.search(r"To retrain this cell: delete results/runs/tiny/\w+/muon/seed0 ", message), force
        assert "rule segment:" not in message and "rule train:" not in message, force
        assert is_complete_probe_file(tmp_path / targets[1]), "the probe file asked for again is left as it was"
    assert forced.returncode == 0 or "Nothing to be done" not in message
    # a kept snapshot is re-probed from disk, without training
    kept = run_snakemake(tmp_path, configfile, *targets, "--forcerun", targets[6])
    assert "rule probe:" in kept.stderr + kept.stdout and "rule segment:" not in kept.stderr + kept.stdout


def test_a_segment_resumed_at_its_own_end_writes_its_snapshot_again(micro_data, tmp_path):
    """A kill after a segment's resume checkpoint but before Snakemake saw it finish: the rerun, which
    Snakemake starts after deleting the segment's outputs, must write the same snapshot and record again."""
    from qkrank import snapshots
    from qkrank.train import train_cell

    cfg = qconfig.load(micro_config())
    settings = qconfig.cell_settings(cfg, qconfig.cells(cfg)[0])
    run = tmp_path / "run"
    for tokens in (0, 512):
        train_cell(settings, micro_data, run, until=tokens)
    first = checkpoint.read_state(snapshots.temp_path(run, 512))
    record = json.loads(snapshots.stamp_path(run, 512).read_text())
    snapshots.temp_path(run, 512).unlink()
    snapshots.stamp_path(run, 512).unlink()
    train_cell(settings, micro_data, run, until=512)
    again = checkpoint.read_state(snapshots.temp_path(run, 512))
    assert all(torch.equal(first["model"][k], again["model"][k]) for k in first["model"])
    assert again["val_loss"] == first["val_loss"] and again["step"] == first["step"] == 2
    rewritten = json.loads(snapshots.stamp_path(run, 512).read_text())
    assert {k: v for k, v in rewritten.items() if k != "sha256"} == {k: v for k, v in record.items() if k != "sha256"}
    assert rewritten["sha256"] == sha256_file(snapshots.temp_path(run, 512))  # the record matches the new file
