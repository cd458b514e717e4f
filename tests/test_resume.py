"""Surviving a cluster: kill -9 and resume bitwise, stop signals, truncated/foreign/unsafe checkpoints, NaN guard."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import env_with_src, micro_config, run_snakemake, train_log, write_config

import qkrank.train as train
from qkrank import checkpoint, runtime
from qkrank import config as qconfig
from qkrank.metrics import DETERMINISTIC_COLUMNS

CELL = "tiny/learned/muon/seed0"
STEPS = 8  # micro config: 2048 tokens / (4 × 1 × 64) tokens per step; checkpoints every 2 steps


def _settings(cfg: dict) -> dict:
    return qconfig.cell_settings(qconfig.load(cfg), qconfig.Cell.parse(CELL))


def _cli(config_path: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "qkrank.train", "--config", str(config_path), "--cell", CELL,
            "--data", str(data), "--out", str(out)]


def _env(**extra) -> dict:
    env = env_with_src()
    for key in (train.FAULT_KILL_AT_STEP, train.FAULT_NAN_AT_STEP):
        env.pop(key, None)
    return env | extra


def deterministic_log(run_dir: Path) -> list[dict]:
    """The metrics CSV without its timing columns, values as written (exact text)."""
    with open(run_dir / "metrics.csv") as f:
        return [{k: row[k] for k in DETERMINISTIC_COLUMNS} for row in csv.DictReader(f)]


def assert_same_run(a: Path, b: Path) -> None:
    """Every snapshot's weights and the loss log are bitwise identical."""
    snaps_a = sorted(p.name for p in (a / "snapshots").glob("*.pt"))
    assert snaps_a == sorted(p.name for p in (b / "snapshots").glob("*.pt"))
    for name in snaps_a:
        wa, wb = (checkpoint.safe_load(d / "snapshots" / name)["model"] for d in (a, b))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"snapshot {name}: {key} differs"
    assert deterministic_log(a) == deterministic_log(b)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, micro_data) -> Path:
    """The micro cell trained without interruption, in this process."""
    out = tmp_path_factory.mktemp("clean") / "run"
    train.train_cell(_settings(micro_config()), micro_data, out)
    assert len(deterministic_log(out)) == STEPS + 1 and not (out / "resume").exists()
    # `auto` precision: these resume tests cover the bf16 autocast path wherever the CPU has native bf16.
    assert json.loads((out / "train.json").read_text())["runtime"]["bf16"] == runtime.cpu_has_native_bf16()
    return out


def _interrupted_by_nan(run_dir: Path, micro_data: Path, monkeypatch, nan_step: int) -> str:
    """Train until the injected NaN at ``nan_step``; returns the divergence message."""
    monkeypatch.setenv(train.FAULT_NAN_AT_STEP, str(nan_step))
    with pytest.raises(train.TrainingDiverged) as err:
        train.train_cell(_settings(micro_config()), micro_data, run_dir)
    monkeypatch.delenv(train.FAULT_NAN_AT_STEP)
    return str(err.value)


@pytest.mark.slow
def test_kill_minus_9_at_a_random_step_then_rerun_is_bitwise_identical(tmp_path, micro_data, clean_run):
    config_path = write_config(tmp_path / "config.yaml", micro_config())
    out = tmp_path / "run"
    kill_step = random.randint(1, STEPS - 1)
    print(f"kill -9 after step {kill_step}")  # shown if the test fails
    killed = subprocess.run(_cli(config_path, micro_data, out), env=_env(**{train.FAULT_KILL_AT_STEP: str(kill_step)}),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, (kill_step, killed.stderr[-2000:])
    assert not (out / "train.json").exists()
    last = checkpoint.tokens_of(checkpoint.list_checkpoints(out / "resume")[-1])
    assert last == kill_step // 2 * 512, f"kill at step {kill_step}: newest resume checkpoint {last}"
    resumed = subprocess.run(_cli(config_path, micro_data, out), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / 'resume' / f'{last}.pt'} at {last:,} tokens" in resumed.stderr
    assert_same_run(clean_run, out)
    assert not (out / "resume").exists()  # a finished cell keeps no resume state


def test_stop_signal_checkpoints_then_resume_is_bitwise_identical(tmp_path, micro_data, clean_run, monkeypatch):
    """A signal mid-run (step 3, off the checkpoint grid) stops after that step; the rerun matches the clean run."""
    real_batch_starts = train.batch_starts

    def signal_during_step_3(seed, step, n_windows, rows):
        if step == 2:  # the third optimizer step
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_batch_starts(seed, step, n_windows, rows)

    out = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(train, "batch_starts", signal_during_step_3)
    with pytest.raises(train.Preempted, match="768 tokens"):
        train.train_cell(_settings(micro_config()), micro_data, out)
    monkeypatch.setattr(train, "batch_starts", real_batch_starts)
    assert signal.getsignal(signal.SIGUSR1) is handler_before  # the loop's handler is gone again
    assert [checkpoint.tokens_of(p) for p in checkpoint.list_checkpoints(out / "resume")] == [512, 768]
    assert [int(r["step"]) for r in deterministic_log(out)] == [0, 1, 2, 3]  # the log so far
    train.train_cell(_settings(micro_config()), micro_data, out)
    assert_same_run(clean_run, out)


def test_segments_hand_on_one_state_file_and_a_stop_mid_segment_resumes_bitwise(tmp_path, micro_data, clean_run,
                                                                               monkeypatch):
    """A segment's end writes one file, its snapshot with the whole resume state (weights once on disk), which the
    next segment starts from; a stop inside a segment resumes from its own checkpoint; the result is the clean run."""
    from qkrank import snapshots

    settings = _settings(micro_config())  # keep_snapshots: final, checkpoints every 512 tokens (2 steps)
    out = tmp_path / "run"
    train.train_cell(settings, micro_data, out, until=0)
    train.train_cell(settings, micro_data, out, until=512)
    state = checkpoint.read_state(snapshots.temp_path(out, 512))
    assert {"model", "optimizers", "rng", "metrics", "val_loss"} <= set(state) and state["tokens_seen"] == 512
    assert checkpoint.list_checkpoints(out / "resume") == []  # no second copy of the weights
    real_batch_starts = train.batch_starts

    def signal_during_step_3(seed, step, n_windows, rows):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_batch_starts(seed, step, n_windows, rows)

    monkeypatch.setattr(train, "batch_starts", signal_during_step_3)
    with pytest.raises(train.Preempted, match="768 tokens"):
        train.train_cell(settings, micro_data, out, until=1024)
    monkeypatch.setattr(train, "batch_starts", real_batch_starts)
    assert [checkpoint.tokens_of(p) for p in checkpoint.list_checkpoints(out / "resume")] == [768]
    train.train_cell(settings, micro_data, out, until=1024)  # resumes at 768, not at the segment's start
    assert checkpoint.list_checkpoints(out / "resume") == []
    snapshots.temp_path(out, 512).unlink()  # what Snakemake does once the probe and the next segment are done
    for tokens in (1536, 2048):
        train.train_cell(settings, micro_data, out, until=tokens)
    assert sorted(p.name for p in (out / "snapshots").glob("*.pt")) == ["2048.pt"]
    final = checkpoint.safe_load(out / "snapshots" / "2048.pt")
    assert "optimizers" not in final  # the kept final snapshot is weights only
    clean = checkpoint.safe_load(clean_run / "snapshots" / "2048.pt")["model"]
    assert all(torch.equal(final["model"][k], clean[k]) for k in clean)
    assert deterministic_log(out) == deterministic_log(clean_run)
    with pytest.raises(checkpoint.CheckpointError, match=r"512\.pt: the state this segment starts from is missing"):
        train.train_cell(settings, micro_data, tmp_path / "other", until=1024)


def test_at_most_two_packed_states_are_ever_on_disk_and_the_cells_end_writes_none(tmp_path, micro_data,
                                                                                  monkeypatch):
    """The disk peak the planner states (qkrank.gpu_hours): while a segment writes its state, the one it started
    from is the only other; the cell's last segment writes its weights, and no state, next to it."""
    from qkrank import snapshots, state_packing

    settings = _settings(micro_config())
    out = tmp_path / "run"
    real_save = checkpoint.atomic_save
    writes = []

    def spy(obj, path):
        on_disk = [p for p in (*out.glob("snapshots/temp/*.pt"), *out.glob("resume/*.pt")) if p != Path(path)]
        packed = any(isinstance(v, dict) and state_packing.MARKER in v for v in obj["model"].values())
        writes.append((Path(path), "optimizers" in obj, packed, len(on_disk)))
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_save", spy)
    marks = qconfig.checkpoint_tokens(settings)
    for previous, tokens in zip([None, *marks[:-1]], marks, strict=True):
        train.train_cell(settings, micro_data, out, until=tokens)
        if previous is not None:
            snapshots.temp_path(out, previous).unlink()  # Snakemake, once its probe and this segment are done
    states = [w for w in writes if w[1]]
    assert states and all(packed for _, _, packed, _ in states)  # every state file is packed
    assert max(others for *_, others in states) == 1  # one other state on disk while a state is written
    assert max(others for *_, others in writes) <= 2  # a kept weights-only copy: after its state, before the old goes
    last = [w for w in writes if w[0].parent == out / "snapshots"]
    assert [(w[0].name, w[1]) for w in last] == [(f"{marks[-1]}.pt", False)]  # the end: weights only
    assert writes[-1][0] == out / "snapshots" / f"{marks[-1]}.pt"  # and nothing after it
    assert checkpoint.list_checkpoints(out / "resume") == []


def test_verify_names_a_damaged_segment_state_with_its_record(tmp_path, micro_data):
    from qkrank import snapshots
    from qkrank import verify as qverify

    settings = _settings(micro_config())
    out = tmp_path / "results" / "runs" / CELL  # where the workflow puts a cell (check_run reads the path)
    for tokens in (0, 512):
        train.train_cell(settings, micro_data, out, until=tokens)
    assert qverify.check_run(out, hashes=True) == []
    state, record = snapshots.temp_path(out, 512), snapshots.stamp_path(out, 512)
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor's bytes: still loads, no longer the recorded file
    state.write_bytes(bytes(data))
    assert qverify.check_run(out, hashes=False) == []  # loadability alone cannot see it
    (problem,) = qverify.check_run(out, hashes=True)
    assert problem.path == state and f"segment state: sha256 differs from {record}" in problem.reason
    assert set(problem.remove) == {state, record}  # --fix: the workflow trains this segment again
    state.write_bytes(bytes(data[: len(data) // 3]))
    (problem,) = qverify.check_run(out, hashes=False)
    assert "segment state: unreadable or truncated checkpoint" in problem.reason


@pytest.mark.slow
def test_sigterm_to_the_process_writes_a_checkpoint_and_exits_75(tmp_path, micro_data):
    """What SLURM does before the time limit (SIGUSR1 takes the same path: see the in-process test above)."""
    cfg = micro_config()
    cfg["scales"]["tiny"]["train"]["total_tokens"] = 256 * 100_000  # far more than it gets to train
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(write_config(tmp_path / "config.yaml", cfg), micro_data, out), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "resume" / "0.pt").exists():  # written once training has begun
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == train.EXIT_PREEMPTED == 75, stderr[-2000:]
    assert "stop signal received" in stderr and "exiting 75" in stderr
    newest = checkpoint.list_checkpoints(out / "resume")[-1]
    state = checkpoint.safe_load(newest)
    assert 0 < state["tokens_seen"] == checkpoint.tokens_of(newest) < cfg["scales"]["tiny"]["train"]["total_tokens"]
    assert state["data_position"]["next_step"] == state["step"] == state["tokens_seen"] // 256
    assert not (out / "train.json").exists()


def test_nan_guard_names_step_and_tokens_and_keeps_the_last_good_checkpoint(tmp_path, micro_data, monkeypatch):
    out = tmp_path / "run"
    message = _interrupted_by_nan(out, micro_data, monkeypatch, nan_step=6)
    assert "training loss is nan at step 6 (tokens seen 1,280)" in message, message
    assert str(out / "resume" / "1024.pt") in message
    kept = checkpoint.list_checkpoints(out / "resume")
    assert [checkpoint.tokens_of(p) for p in kept] == [512, 1024]  # keep_resume_checkpoints = 2
    assert not (out / "snapshots" / "1536.pt").exists() and not (out / "train.json").exists()
    state = checkpoint.read_state(kept[-1])
    for key, value in state["model"].items():
        assert torch.isfinite(value).all(), key
    # Everything a resume needs, loaded with weights_only=True.
    assert {"model", "optimizers", "rng", "metrics", "tokens_seen", "step", "config_hash", "data_hash",
            "data_position", "schedule", "wall_s"} <= state.keys()
    assert set(state["optimizers"]) == {"muon", "adamw"} and {"torch", "numpy", "python"} <= state["rng"].keys()
    assert (state["tokens_seen"], state["step"], state["data_position"]["next_step"]) == (1024, 4, 4)
    assert state["config_hash"] == qconfig.config_hash(qconfig.training_identity(_settings(micro_config())))


def test_truncated_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, micro_data, clean_run,
                                                                                monkeypatch):
    out = tmp_path / "run"
    _interrupted_by_nan(out, micro_data, monkeypatch, nan_step=8)  # leaves resume/1024.pt and 1536.pt
    latest = out / "resume" / "1536.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"skipping corrupt resume checkpoint.*1536\.pt.*truncated"):
        train.train_cell(_settings(micro_config()), micro_data, out)
    assert_same_run(clean_run, out)


def test_checkpoint_of_another_config_is_an_error_naming_the_path(tmp_path, micro_data, monkeypatch):
    out = tmp_path / "run"
    _interrupted_by_nan(out, micro_data, monkeypatch, nan_step=4)
    changed = micro_config()
    changed["scales"]["tiny"]["optim"] = {"adamw": {"lr": 0.001}}
    with pytest.raises(checkpoint.CheckpointError) as err:
        train.train_cell(_settings(changed), micro_data, out)
    assert str(out / "resume" / "512.pt") in str(err.value) and f"delete {out / 'resume'}" in str(err.value)


class _CodePayload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_with_a_code_payload_is_refused_and_never_run(tmp_path, writer):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "resume" / "512.pt"
    path.parent.mkdir()
    payload = {"model": {}, "config_hash": "x", "evil": _CodePayload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=f"{path}: refused to load"):
        checkpoint.safe_load(path)
    # Not skipped as "corrupt" either: resume stops and names the file.
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=str(path)):
        checkpoint.latest_valid(path.parent, "x")
    assert not marker.exists()
    # The payload is real: an unsafe load runs it (the raw pickle then fails torch's format check).
    with contextlib.suppress(RuntimeError):
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.slow
def test_workflow_rerun_after_a_killed_train_job_resumes_to_the_same_result(tmp_path, micro_data, clean_run,
                                                                             monkeypatch):
    """The real workflow: a train job dies (kill -9), the same snakemake command is run again."""
    cfg = micro_config()
    cfg["grid"]["modes"] = ["learned"]
    cfg["scales"]["tiny"]["train"]["keep_snapshots"] = "all"  # every snapshot is compared with a clean run's
    configfile = write_config(tmp_path / "config.yaml", cfg)
    target = f"results/runs/{CELL}/train.json"
    # The fixture's token shards stand in for the data job's (same config, same bytes): saves a tokenizer run.
    shutil.copytree(micro_data, tmp_path / "results" / "data")
    monkeypatch.setenv(train.FAULT_KILL_AT_STEP, "5")  # inherited by snakemake and its jobs
    failed = run_snakemake(tmp_path, configfile, target, check=False)
    monkeypatch.delenv(train.FAULT_KILL_AT_STEP)
    assert failed.returncode != 0, failed.stderr[-3000:]
    run_dir = tmp_path / "results" / "runs" / CELL
    assert [checkpoint.tokens_of(p) for p in checkpoint.list_checkpoints(run_dir / "resume")] == [512, 1024]
    run_snakemake(tmp_path, configfile, target)
    log = train_log(tmp_path / "results", CELL)
    assert f"resumed from results/runs/{CELL}/resume/1024.pt at 1,024 tokens" in log, log[-2000:]
    assert_same_run(clean_run, run_dir)
