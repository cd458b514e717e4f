"""Fault injection on the real workflow: kill -9 at chosen moments, corrupt files, NaN, pickle payloads.

Every kill is timed by watching a file appear (a resume checkpoint, the first probe file, the aggregate
log), never by sleeping. After a kill the same command is run again (after ``snakemake --unlock``: a
killed snakemake leaves its lock) and must reproduce the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from conftest import REPO, env_with_src, micro_config, run_snakemake, train_log, write_config

from qkrank import checkpoint, verify
from qkrank.data import sha256_file

CELL = "tiny/learned/muon/seed0"
TIMING_COLUMNS = {"tokens_per_s", "wall_s"}  # machine speed, not results
WAIT_S = 600


def fault_config() -> dict:
    """One cell, three probe points (0, 512, 1024 tokens): the whole pipeline in a few jobs."""
    cfg = micro_config()
    cfg["grid"]["modes"] = ["learned"]
    cfg["scales"]["tiny"]["train"]["total_tokens"] = 1024
    cfg["scales"]["tiny"]["train"]["checkpoint_every_tokens"] = 512
    cfg["aggregate"]["marks_tokens"] = [512, 1024]
    cfg["scales"]["tiny"]["train"]["keep_snapshots"] = "all"  # the faults below damage snapshots on disk
    return cfg


def new_study(workdir: Path, micro_data: Path, cfg: dict) -> Path:
    """A study directory whose token shards are the session's prepared micro data (the data job is skipped)."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(micro_data, workdir / "results" / "data")
    return write_config(workdir / "study.yaml", cfg)


def snakemake_cmd(workdir: Path, configfile: Path, *targets: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(configfile), "--cores", "2", "--rerun-incomplete", *targets]


def run_until_then_kill(cmd: list[str], appeared, log: Path) -> None:
    """Start the workflow in its own process group; the moment ``appeared()`` is true, SIGKILL all of it."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env_with_src(),
                                start_new_session=True)
    deadline = time.monotonic() + WAIT_S
    family: list[psutil.Process] = []
    try:
        while not appeared():
            if proc.poll() is not None:
                raise AssertionError(f"workflow ended ({proc.returncode}) before the kill point:\n"
                                     f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"kill point not reached in {WAIT_S} s")
            time.sleep(0.01)
        family = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        for child in family:  # anything that left the group dies too, as on a lost node
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    psutil.wait_procs(family, timeout=10)


def unlock(workdir: Path) -> None:
    """What ``snakemake --unlock`` does after a crash (delete its lock files), without parsing the workflow again."""
    locks = workdir / ".snakemake" / "locks"
    assert any(locks.iterdir()), "a killed snakemake leaves its lock behind"
    for lock in locks.iterdir():
        lock.unlink()


def assert_no_bad_final_file(results: Path) -> None:
    """Whatever a kill left under a final name is sound (partial files exist only under temporary names)."""
    problems = verify.check_results(results, hashes=True)
    assert not problems, "\n".join(map(str, problems))


def read_tables(results: Path) -> dict[str, object]:
    tables = {}
    for path in sorted((results / "tables").iterdir()):
        if path.suffix == ".csv":
            frame = pd.read_csv(path)
            tables[path.name] = frame.drop(columns=[c for c in frame.columns if c in TIMING_COLUMNS])
        elif path.suffix == ".md":
            tables[path.name] = path.read_text()
    return tables


def final_weights(results: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((results / "runs" / CELL / "train.json").read_text())
    final = max(manifest["snapshots"], key=int)
    return checkpoint.safe_load(results / "runs" / CELL / manifest["snapshots"][final]["path"])["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_data):
    """The uninterrupted run every faulted run must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    configfile = new_study(workdir, micro_data, fault_config())
    run_snakemake(workdir, configfile, "aggregate")
    return workdir, configfile


def test_kill_during_training_probe_and_aggregation_then_rerun_reproduces_the_run(reference, micro_data, tmp_path):
    ref_dir, _ = reference
    workdir = tmp_path / "killed"
    configfile = new_study(workdir, micro_data, fault_config())
    results, run = workdir / "results", workdir / "results" / "runs" / CELL
    cmd = snakemake_cmd(workdir, configfile, "aggregate")

    # 1. during training: a mid-run resume checkpoint exists, the cell is not finished
    run_until_then_kill(cmd, lambda: (run / "resume" / "512.pt").exists(), tmp_path / "run1.log")
    assert not (run / "train.json").exists(), "the kill came after training had finished"
    assert_no_bad_final_file(results)

    # 2. during probing: a new probe file is there, not all of them (a segment's snapshot is probed while the
    # next segment trains, so the first may already exist)
    unlock(workdir)
    probed = set((run / "probe").glob("*.h5"))
    run_until_then_kill(cmd, lambda: set((run / "probe").glob("*.h5")) - probed, tmp_path / "run2.log")
    assert len(list((run / "probe").glob("*.h5"))) < 3, "the kill came after every probe had finished"
    assert_no_bad_final_file(results)

    # 3. during aggregation: its job has started (log opened), its tables are not written
    unlock(workdir)
    run_until_then_kill(cmd, lambda: (results / "logs" / "aggregate.log").exists(), tmp_path / "run3.log")
    assert not (results / "tables" / "summary_seed004.md").exists(), "the kill came after aggregation"
    assert_no_bad_final_file(results)

    # and two probe files damaged while the workflow was down: one truncated, one with a flipped header bit
    truncated, flipped = run / "probe" / "512.h5", run / "probe" / "0.h5"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[2] ^= 0x10  # inside the HDF5 signature
    flipped.write_bytes(bytes(data))

    # a dry run deletes nothing (no parse-time cleanup to race with a running study); verify --fix finds them
    unlock(workdir)
    run_snakemake(workdir, configfile, "-n", "aggregate")
    assert truncated.exists() and flipped.exists()
    fixed = subprocess.run([sys.executable, "-m", "qkrank.verify", "--results", str(results), "--fix"],
                           capture_output=True, text=True, env=env_with_src())
    assert fixed.returncode == 0, fixed.stderr
    for damaged in (truncated, flipped):
        assert f"BAD {damaged}" in fixed.stdout and not damaged.exists(), fixed.stdout
    run_snakemake(workdir, configfile, "aggregate", "--rerun-incomplete")
    reference_tables, tables = read_tables(ref_dir / "results"), read_tables(results)
    assert sorted(tables) == sorted(reference_tables)
    for name, table in tables.items():
        if isinstance(table, pd.DataFrame):
            pd.testing.assert_frame_equal(table, reference_tables[name], check_exact=True, obj=name)
        else:
            assert table == reference_tables[name], name
    ref_weights, weights = final_weights(ref_dir / "results"), final_weights(results)
    assert ref_weights.keys() == weights.keys()
    for key in weights:
        assert torch.equal(weights[key], ref_weights[key]), key


def _copy_study(reference, tmp_path: Path) -> tuple[Path, Path]:
    ref_dir, _ = reference
    workdir = tmp_path / "copy"
    shutil.copytree(ref_dir, workdir, symlinks=True)
    return workdir, workdir / "study.yaml"


def _flip_bit(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_shard_and_probe_file_survive_a_dry_run_and_verify_fix_replans_them(reference, tmp_path):
    workdir, configfile = _copy_study(reference, tmp_path)
    results = workdir / "results"
    data, probe = results / "data", results / "runs" / CELL / "probe" / "512.h5"
    (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:-2])
    probe.write_bytes(b"\0" * 64 + probe.read_bytes()[64:])  # the HDF5 superblock wiped
    before = sorted(p for p in results.rglob("*") if p.is_file() and "logs" not in p.parts)
    run_snakemake(workdir, configfile, "-n", "aggregate")
    assert sorted(p for p in results.rglob("*") if p.is_file() and "logs" not in p.parts) == before, \
        "building the DAG deleted files"
    fixed = subprocess.run([sys.executable, "-m", "qkrank.verify", "--results", str(results), "--fix"],
                           capture_output=True, text=True, env=env_with_src())
    assert f"BAD {data / 'train.bin'}" in fixed.stdout and "the manifest says" in fixed.stdout, fixed.stdout
    assert f"BAD {probe}" in fixed.stdout, fixed.stdout
    assert f"rebuilt {data}" in fixed.stdout and verify.check_data(data, hashes=True) == [], "data rebuilt in place"
    assert not probe.exists() and not (results / "tables" / "probes.csv").exists()
    plan = run_snakemake(workdir, configfile, "-n", "aggregate").stdout
    assert "rule probe:" in plan and "rule aggregate:" in plan, "the probe file and the tables are rebuilt"
    assert "rule data:" not in plan and "rule train:" not in plan, "identical data retrains nothing"


def test_corrupt_snapshots_and_shard_are_named_by_verify_and_fixed(reference, tmp_path):
    workdir, configfile = _copy_study(reference, tmp_path)
    results, run = workdir / "results", workdir / "results" / "runs" / CELL
    truncated, flipped = run / "snapshots" / "1024.pt", run / "snapshots" / "512.pt"
    shard = results / "data" / "val.bin"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    _flip_bit(flipped)  # in the tensor bytes: only its sha256 can tell
    _flip_bit(shard)
    cheap = {p.path: p.reason for p in verify.check_results(results)}
    assert cheap.keys() == {truncated} and "unreadable or truncated checkpoint" in cheap[truncated], cheap
    cmd = [sys.executable, "-m", "qkrank.verify", "--results", str(results)]
    deep = subprocess.run(cmd + ["--hashes"], capture_output=True, text=True, env=env_with_src())
    assert deep.returncode != 0
    for path in (truncated, flipped, shard):
        assert f"BAD {path}" in deep.stdout, deep.stdout
    assert "sha256 differs from train.json" in deep.stdout and "sha256 differs from manifest.json" in deep.stdout

    # the probe stage refuses the flipped snapshot and names it
    probe = subprocess.run([sys.executable, "-m", "qkrank.probe", "--settings", str(run / "settings.json"), "--data",
                            str(results / "data"), "--run-dir", str(run), "--tokens", "512",
                            "--out", str(tmp_path / "p.h5")], capture_output=True, text=True, env=env_with_src())
    assert probe.returncode != 0 and str(flipped) in probe.stderr and "sha256" in probe.stderr, probe.stderr
    assert not (tmp_path / "p.h5").exists()

    fixed = subprocess.run(cmd + ["--hashes", "--fix"], capture_output=True, text=True, env=env_with_src())
    assert fixed.returncode == 0, fixed.stderr
    assert not truncated.exists() and not flipped.exists() and not (run / "train.json").exists()
    assert verify.check_results(results, hashes=True) == []
    plan = run_snakemake(workdir, configfile, "-n", "aggregate")
    assert "rule train:" in plan.stdout and "rule data:" not in plan.stdout, "snapshots retrained, data rebuilt"


def test_nan_mid_training_stops_that_cell_naming_the_step_while_others_finish(micro_data, tmp_path):
    cfg = fault_config()
    cfg["grid"]["modes"] = ["learned", "none"]
    cfg["scales"]["tiny"]["train"]["total_tokens"] = 512  # 2 steps: never reaches the faulty step
    cfg["cell_overrides"] = {CELL: {"train": {"total_tokens": 2048}}}  # 8 steps: step 5 is poisoned
    configfile = new_study(tmp_path, micro_data, cfg)
    runs = tmp_path / "results" / "runs"
    targets = [f"results/runs/{cell}/train.json" for cell in (CELL, "tiny/none/muon/seed0")]
    env = env_with_src() | {"QKRANK_FAULT_NAN_AT_STEP": "5"}
    proc = subprocess.run(snakemake_cmd(tmp_path, configfile, *targets) + ["--keep-going"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode != 0
    log = train_log(tmp_path / "results", CELL)
    assert "training loss is nan at step 5" in log, log[-2000:]
    assert not (runs / CELL / "train.json").exists()
    # metrics.csv is rewritten at every snapshot point (readable during the run): it ends at the last good one
    metrics = runs / CELL / "metrics.csv"
    assert not metrics.exists() or pd.read_csv(metrics)["tokens_seen"].max() == 1024
    assert (runs / "tiny/none/muon/seed0/train.json").exists(), "the healthy cell completes (--keep-going)"


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_loading_a_checkpoint_never_runs_a_pickle_payload(reference, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "tokens_seen": 0, "hook": _Payload(marker)}, evil)
    with pytest.raises(checkpoint.CheckpointError, match=str(evil)):
        checkpoint.safe_load(evil)
    assert "refused" in verify.checkpoint_problem(evil)
    resume = tmp_path / "resume"
    resume.mkdir()
    shutil.copy(evil, resume / "512.pt")
    with pytest.raises(checkpoint.CheckpointError, match="512.pt.*refused"):
        checkpoint.latest_valid(resume, "any")  # the resume scan stops on it, never executes it

    # a snapshot swapped for the payload, its sha256 even matching train.json: the probe stage still refuses
    workdir, _ = _copy_study(reference, tmp_path)
    run = workdir / "results" / "runs" / CELL
    shutil.copy(evil, run / "snapshots" / "512.pt")
    manifest = json.loads((run / "train.json").read_text())
    manifest["snapshots"]["512"]["sha256"] = sha256_file(run / "snapshots" / "512.pt")
    (run / "train.json").write_text(json.dumps(manifest))
    probe = subprocess.run([sys.executable, "-m", "qkrank.probe", "--settings", str(run / "settings.json"), "--data",
                            str(workdir / "results" / "data"), "--run-dir", str(run), "--tokens", "512",
                            "--out", str(tmp_path / "p.h5")], capture_output=True, text=True, env=env_with_src())
    assert probe.returncode != 0 and "512.pt" in probe.stderr, probe.stderr
    assert not marker.exists(), "the pickle payload was executed"
