"""DDP on CPU: ``torchrun --nproc_per_node=2`` with gloo trains the same cell as one process, and resumes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import env_with_src, micro_config, write_config

import qkrank.train as train
from qkrank import config as qconfig
from qkrank.metrics import DETERMINISTIC_COLUMNS

CELL = "tiny/learned/muon/seed0"
# Loss curves of 2 processes vs 1 agree to float32 reduction order only: each process averages half of every
# micro-batch and DDP averages the gradients, and Muon orthogonalises in bf16, so tiny differences grow a little
# over the steps. Measured: at most 5e-5 nats over 8 steps. A wrong global batch or a missing gradient
# average moves the loss by 1e-2 or more.
LOSS_TOLERANCE = 5e-4
EXACT_COLUMNS = ("tokens_seen", "step", "lr_muon", "lr_adamw")


def _log(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: row[k] for k in DETERMINISTIC_COLUMNS} for row in csv.DictReader(f)]


def _torchrun(config_path: Path, data: Path, out: Path, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "qkrank.train", "--config", str(config_path), "--cell", CELL, "--data", str(data), "--out", str(out)]
    base = env_with_src()
    for key in (train.FAULT_KILL_AT_STEP, train.FAULT_NAN_AT_STEP):
        base.pop(key, None)
    return subprocess.run(cmd, env=base | env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])  # fused: AdamW and the head loss
def test_two_gloo_processes_give_the_loss_curve_of_one_and_resume_after_kill(tmp_path, micro_data, fused):
    cfg = micro_config()
    cfg["grid"]["modes"] = ["learned"]
    # Global batch: micro_batch 4 (2 rows per process) × grad_accum 2 × 64 = 512 tokens per step, 8 steps.
    cfg["scales"]["tiny"]["train"].update(grad_accum=2, nproc=2, total_tokens=4096, checkpoint_every_tokens=1024,
                                          fused=fused)
    config_path = write_config(tmp_path / "config.yaml", cfg)
    ddp = tmp_path / "ddp"

    killed = _torchrun(config_path, micro_data, ddp, **{train.FAULT_KILL_AT_STEP: "3"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert sorted(p.name for p in (ddp / "resume").iterdir()) == ["0.pt", "1024.pt"]
    resumed = _torchrun(config_path, micro_data, ddp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Rank 0 alone reports and writes.
    assert resumed.stderr.count(f"resumed from {ddp / 'resume' / '1024.pt'} at 1,024 tokens") == 1, resumed.stderr
    assert not (ddp / "resume").exists() and not list(ddp.rglob("*.tmp"))
    manifest = json.loads((ddp / "train.json").read_text())
    assert (manifest["runtime"]["world_size"], manifest["runtime"]["backend"], manifest["steps"]) == (2, "gloo", 8)
    assert manifest["runtime"]["fused"] is fused

    single = tmp_path / "single"
    train.train_cell(qconfig.cell_settings(qconfig.load(cfg), qconfig.Cell.parse(CELL)), micro_data, single)

    curve_1, curve_2 = _log(single), _log(ddp)
    assert len(curve_1) == len(curve_2) == 9
    for row_1, row_2 in zip(curve_1, curve_2, strict=True):
        assert {k: row_1[k] for k in EXACT_COLUMNS} == {k: row_2[k] for k in EXACT_COLUMNS}
        for column in ("train_loss", "val_loss"):
            assert (row_1[column] == "") == (row_2[column] == "")
            if row_1[column]:
                assert float(row_2[column]) == pytest.approx(float(row_1[column]), abs=LOSS_TOLERANCE), (column, row_1)
        if row_1["grad_norm"]:
            assert float(row_2["grad_norm"]) == pytest.approx(float(row_1["grad_norm"]), rel=1e-2)
