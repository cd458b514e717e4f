"""The seeds' configs in configs/: valid, faithful to the seeds, and a full offline DAG for each."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import micro_config, write_config

from qkrank import config as qconfig
from qkrank import gpu_hours

REPO = Path(__file__).resolve().parents[1]
# Trained studies; configs/public_suites.yaml (probes only, no training) is tested in tests/test_suites.py.
CONFIGS = {path.stem: path for path in sorted((REPO / "configs").glob("*.yaml")) if path.stem != "public_suites"}
M = 1_000_000


def load(name: str) -> dict:
    return qconfig.load(CONFIGS[name])


def settings(config: dict, cell_id: str) -> dict:
    return qconfig.cell_settings(config, qconfig.Cell.parse(cell_id))


def test_every_seed_config_is_there():
    assert {"seed000_88m", "seed004_1p5b", "next_steps"} <= set(CONFIGS)


def offline_env() -> dict:
    """An environment in which any attempt to reach the Hub or the network fails at once."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """``snakemake -n --configfile configs/X.yaml`` for every config, run side by side, offline, in empty dirs.

    Also "torchrun_cell": the micro study with a two-process cell, printing its shell commands.
    """
    ddp = micro_config()
    ddp["scales"]["tiny"]["train"]["nproc"] = 2
    ddp["scales"]["tiny"]["resources"] = {"train": {"gpus": 2, "cpus": 8}}
    configs = {**CONFIGS, "torchrun_cell": write_config(tmp_path_factory.mktemp("ddp") / "ddp.yaml", ddp)}
    procs = {}
    for name, path in configs.items():
        workdir = tmp_path_factory.mktemp(f"dry_{name}")
        quiet = ["--printshellcmds"] if name == "torchrun_cell" else ["--quiet", "rules"]
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(path), "-n", *quiet, "--cores", "1"]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=offline_env()), workdir)
    results = {}
    for name, (proc, workdir) in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), workdir)
    return results


def job_counts(output: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", output, flags=re.M)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dry_run_builds_the_whole_dag_offline(dry_runs, name):
    proc, workdir = dry_runs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = load(name)
    cells = qconfig.cells(config)
    counts = job_counts(proc.stdout + proc.stderr)
    probes = sum(len(qconfig.checkpoint_tokens(qconfig.cell_settings(config, c))) for c in cells)
    assert counts["data"] == 1 and counts["train"] == len(cells) and counts["cell_settings"] == len(cells)
    assert counts["probe"] == probes
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    # Nothing was read or written: the data is fetched by the data job, never while the DAG is built.
    assert not (workdir / config["results_dir"]).exists()


def test_a_multi_process_cell_launches_with_torchrun_in_one_job(dry_runs):
    proc, _ = dry_runs["torchrun_cell"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_jobs = [block for block in re.split(r"\n(?=\[)", proc.stdout) if "\nrule train:" in block]
    assert len(train_jobs) == 3
    for block in train_jobs:
        assert "-m torch.distributed.run --standalone --nproc_per_node=2 -m qkrank.train" in block
        assert re.search(r"resources:.*\bgpu=2\b", block)  # the SLURM plugin's --gpus=2 for the one job


def test_seed000_matches_the_seed():
    config = load("seed000_88m")
    assert config["grid"] == {"scales": ["88m_20m", "88m"], "modes": ["learned", "none"], "optimizers": ["muon"],
                              "seeds": [0]}
    assert config["data"]["hf"]["sources"][0]["path"] == "HuggingFaceFW/fineweb-edu"
    # Two experiments, as in the seed: ~20M tokens (marks 4M and 16M) and 25M tokens (mark 25M).
    runs = {scale: settings(config, f"{scale}/learned/muon/seed0") for scale in ("88m_20m", "88m")}
    assert abs(runs["88m"]["train"]["total_tokens"] - 25 * M) < 0.01 * 25 * M
    assert abs(runs["88m_20m"]["train"]["total_tokens"] - 20 * M) < 0.01 * 20 * M
    for s in runs.values():
        assert abs(s["train"]["checkpoint_every_tokens"] - M) < 0.01 * M  # probe every ≈1M tokens
        assert s["train"]["keep_snapshots"] == "final"
        # identical but for the run's length (and so its schedule)
        assert qconfig.training_identity(s)["model"] == qconfig.training_identity(runs["88m"])["model"]
        assert s["optim"] == runs["88m"]["optim"] and s["probe"] == runs["88m"]["probe"]
    marks, sources = config["aggregate"]["marks_tokens"], config["aggregate"]["marks_from"]
    assert dict(zip(marks, sources, strict=True)) == {4 * M: "88m_20m", 16 * M: "88m_20m", 25 * M: "88m"}
    for mark, scale in zip(marks, sources, strict=True):  # each mark is a snapshot of its run, within 1%
        assert min(abs(t - mark) for t in qconfig.checkpoint_tokens(runs[scale])) < 0.01 * mark


def test_marks_from_names_one_grid_scale_per_mark():
    cfg = micro_config()
    cfg["aggregate"]["marks_from"] = ["tiny"]
    with pytest.raises(qconfig.ConfigError, match=r"'aggregate\.marks_from': 1 entries for 2 marks_tokens"):
        qconfig.load(cfg)
    cfg["aggregate"]["marks_from"] = ["tiny", "88m"]
    with pytest.raises(qconfig.ConfigError, match=r"'aggregate\.marks_from\[1\]': '88m' is not a scale"):
        qconfig.load(cfg)


def test_seed004_matches_the_seed():
    config = load("seed004_1p5b")
    assert config["grid"]["modes"] == ["learned", "frozen", "none"] and config["grid"]["scales"] == ["1.5b"]
    assert [s["path"] for s in config["data"]["hf"]["sources"]] == ["HuggingFaceFW/fineweb-edu",
                                                                    "HuggingFaceTB/cosmopedia"]
    s = settings(config, "1.5b/learned/muon/seed0")
    train = s["train"]
    assert (train["micro_batch"], train["grad_accum"], train["seq_len"]) == (8, 4, 2048)
    assert qconfig.tokens_per_step(train) == 65_536
    # "Every 120 steps, ≈ 2M tokens" are micro-steps of 8 × 2048 tokens, and there are 26 points incl. 0.
    assert train["checkpoint_every_tokens"] == 120 * 8 * 2048
    assert len(qconfig.checkpoint_tokens(s)) == 26
    assert train["keep_snapshots"] == "final"
    assert abs(train["total_tokens"] - 49 * M) < 0.01 * 49 * M
    assert config["data"]["train_tokens"] == 1000 * M  # the seed's 1B-token subset


def test_next_steps_grid():
    config = load("next_steps")
    grid = config["grid"]
    assert len(grid["seeds"]) >= 3 and {"muon", "adamw"} <= set(grid["optimizers"])
    assert set(grid["modes"]) == {"learned", "frozen", "none"}
    for cell in qconfig.cells(config):
        s = qconfig.cell_settings(config, cell)
        assert abs(s["train"]["total_tokens"] - 250 * M) < 0.01 * 250 * M
        # The collapse (seed 004: 7.9-9.8M tokens) is resolved: at least 8 probe points in the first 16M.
        marks = qconfig.checkpoint_tokens(s)
        assert sum(1 for t in marks if 0 < t <= 16 * M) >= 8, cell.id
        assert sum(1 for t in marks if 7 * M <= t <= 10 * M) >= 2, cell.id
        assert s["train"]["keep_snapshots"] == "final"
    # The AdamW baseline changes only the hidden matrices' optimizer: everything else AdamW trains has the
    # same settings in the muon and adamw cells of a scale, and the hidden matrices get their own rate.
    for scale in grid["scales"]:
        muon, adamw = (settings(config, f"{scale}/learned/{o}/seed0")["optim"] for o in ("muon", "adamw"))
        assert muon["adamw"] == adamw["adamw"] and muon["schedule"] == adamw["schedule"]
        assert adamw["adamw_hidden"]["lr"] < adamw["adamw"]["lr"]
    assert not config["cell_overrides"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cluster_settings_are_consistent(name):
    config = load(name)
    assert (config["data"]["tokenizer"]["kind"], config["data"]["tokenizer"]["name_or_path"]) == ("pretrained", "gpt2")
    for cell in qconfig.cells(config):
        s = qconfig.cell_settings(config, cell)
        res = s["resources"]
        assert res["train"]["gpus"] >= s["train"]["nproc"]  # a torchrun cell has a GPU per process
        assert s["probe"]["save_activations"] is False
        assert s["train"]["bf16"] == s["train"]["compile"] == "auto"
        large = s["model"]["preset"] == "1.5b"
        assert (res["probe"]["gpus"] >= 1) == large and (s["probe"]["device"] == "cuda") == large
        assert s["model"].get("vocab_size", 50257) >= 50257  # GPT-2's tokenizer fits the embedding


# ---------------------------------------------------------------- GPU-hours

def test_gpu_hours_formula_by_hand():
    # 6 · 1e9 · 1e9 = 6e18 FLOPs at 50% of 989 TFLOP/s: 6e18 / 4.945e14 s = 3.370 h.
    assert gpu_hours.training_flops(10**9, 10**9) == 6e18
    assert gpu_hours.gpu_hours(10**9, 10**9, mfu=0.5) == pytest.approx(6e18 / 4.945e14 / 3600)
    assert gpu_hours.gpu_hours(10**9, 10**9, mfu=0.5) == pytest.approx(3.3704, rel=1e-4)


def test_gpu_hours_of_the_seed004_study():
    rows = gpu_hours.study_rows(load("seed004_1p5b"), mfu=0.4)
    assert len(rows) == 1 and rows[0]["cells"] == 3
    import torch

    from qkrank.model import GPT, ModelConfig

    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(ModelConfig.from_preset("1.5b")).parameters())
    assert rows[0]["n_params"] == n_params
    assert rows[0]["gpu_hours"] == pytest.approx(3 * 6 * n_params * 49_152_000 / (0.4 * 989e12) / 3600)
    table = gpu_hours.markdown_table(rows, 0.4)
    assert "| 1.5b |" in table and "40% MFU" in table


def test_planner_disk_of_the_seed004_study_by_hand():
    import torch

    from qkrank.model import GPT, ModelConfig
    from qkrank.optim import split_parameters

    with torch.device("meta"):
        model = GPT(ModelConfig.from_preset("1.5b"))
    n = sum(p.numel() for p in model.parameters())
    hidden = sum(p.numel() for _, p in split_parameters(model, "muon")["muon"])
    config = load("seed004_1p5b")
    (row,) = gpu_hours.study_rows(config, mfu=0.4)
    plain = 4 * n + 4 * hidden + 8 * (n - hidden)  # weights, Muon momentum, AdamW's two moments
    resume = round(gpu_hours.PACKED_STATE_RATIO * plain)  # stored packed (qkrank.state_packing)
    assert (row["snapshot_bytes"], row["resume_bytes"]) == (4 * n, resume)
    probes = row["final_bytes"] - 4 * n
    assert 0 < probes < 0.05 * 4 * n  # 26 probe files of spectra are small next to one snapshot
    # two segment state files, each the snapshot with its resume state (the weights once), nothing kept before the end
    assert row["peak_bytes"] == 2 * resume + probes
    assert row["peak_bytes"] < 25e9  # 38.9 GB with separate plain snapshot and resume files, 26.3 GB unpacked
    (worst,) = gpu_hours.study_rows(config, mfu=0.4, packed_ratio=1.0)
    assert worst["peak_bytes"] == 2 * plain + probes
    totals = gpu_hours.study_totals([row])
    assert totals["keep_all_bytes"] == 3 * (26 * 4 * n + probes)
    assert totals["keep_all_bytes"] > 480e9 and totals["snapshots_one_at_a_time_bytes"] < 26e9
    assert totals["final_bytes"] == 3 * (4 * n + probes)


def test_planner_counts_kept_snapshots():
    cfg = micro_config()
    base = qconfig.load(cfg)
    cell = qconfig.cells(base)[0]
    plans = {}
    for keep in ("final", [512], "all"):
        cfg["scales"]["tiny"]["train"]["keep_snapshots"] = keep
        plans[str(keep)] = gpu_hours.cell_plan(qconfig.cell_settings(qconfig.load(cfg), cell))
    snap = plans["final"]["snapshot_bytes"]
    assert [plans[k]["kept"] for k in ("final", "[512]", "all")] == [1, 2, 5]
    assert plans["[512]"]["peak_bytes"] - plans["final"]["peak_bytes"] == snap
    assert plans["all"]["final_bytes"] - plans["final"]["final_bytes"] == 4 * snap
    assert plans["all"]["peak_snapshot_bytes"] == 5 * snap  # never more than the schedule's points
    # only 0 and the end: the first segment's state is the only state, and the last segment writes none
    cfg["scales"]["tiny"]["train"].update(keep_snapshots="final", checkpoint_every_tokens=2048)
    two = gpu_hours.cell_plan(qconfig.cell_settings(qconfig.load(cfg), cell))
    probes = two["final_bytes"] - snap
    assert two["snapshots"] == 2 and two["peak_bytes"] == two["resume_bytes"] + snap + probes


def test_each_mark_comes_from_its_run():
    import pandas as pd

    from qkrank.tables import resolve_marks

    rows = [{"scale": scale, "mode": "learned", "optimizer": "muon", "seed": 0, "tokens_seen": t}
            for scale, total in (("88m_20m", 20), ("88m", 25)) for t in range(0, total + 1)]
    marks = resolve_marks([4, 16, 25], pd.DataFrame(rows), ["88m_20m", "88m_20m", "88m"])
    assert sorted(zip(marks.scale, marks.mark_tokens, marks.checkpoint_tokens, strict=True)) == [
        ("88m", 25, 25), ("88m_20m", 4, 4), ("88m_20m", 16, 16)]
    every = resolve_marks([4, 16, 25], pd.DataFrame(rows))  # without marks_from: every run at every mark
    assert len(every) == 6 and set(every[every.scale == "88m_20m"].checkpoint_tokens) == {4, 16, 20}
