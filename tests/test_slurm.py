"""The SLURM profile against a real SLURM: `tests/slurm/cluster.sh start` runs a one-node cluster on localhost.

Two runs go through workflow/profiles/slurm at once (the machine's CPUs are shared between them):
- the micro study (data, training, probes, aggregation as sbatch jobs), whose tables and probe values must
  equal a local run's: training and probes are deterministic on CPU;
- a training job with a 1-minute time limit and far more work than fits: SLURM ends it as TIMEOUT, the
  train stage checkpoints on the SIGTERM, `retries` submits it again, and the new attempt resumes from
  that checkpoint. The run is then stopped (SIGINT: Snakemake cancels its SLURM jobs).
Skipped when no cluster is up. Run by hand: tests/slurm/cluster.sh start && pytest -m slurm tests/test_slurm.py
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, env_with_src, micro_config, run_snakemake, train_log, write_config

from qkrank import config as qconfig
from qkrank.data import prepare

pytestmark = pytest.mark.slurm

PROFILE = REPO / "workflow" / "profiles" / "slurm"
CELL = "tiny/learned/muon/seed0"
# Overrides of the profile for the test node: small memory and time requests, no account, keep every job's log.
TEST_CLUSTER_ARGS = ("--slurm-no-account", "--slurm-keep-successful-logs", "--jobs", "8",
                     "--set-resources", "data:mem_mb=500", "data:runtime=10", "aggregate:mem_mb=500",
                     "aggregate:runtime=10")
# Columns that measure time, not results.
TIMING_COLUMNS = {"tokens_per_s", "wall_s", "seconds", "elapsed_s"}


def cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    for tool in ("sbatch", "squeue", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not found (tests/slurm/cluster.sh install)"
    # find_spec, not import: importing the plugin asks slurmctld for its config, slow when it is down.
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return "no SLURM controller is up (tests/slurm/cluster.sh start)"
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    if not re.search(r"^ClusterName\s*=\s*qkrank$", conf, re.M) and not os.environ.get("QKRANK_SLURM_ANY_CLUSTER"):
        return "the SLURM cluster up is not tests/slurm/cluster.sh's (set QKRANK_SLURM_ANY_CLUSTER=1 to use it)"
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout
    if not re.search(r"^(idle|mixed|alloc)", state, re.M):
        return f"no SLURM node is up (sinfo says {state.strip()!r})"
    return None


def slurm_snakemake(workdir: Path, configfile: Path, target: str, *args: str, log: Path) -> subprocess.Popen:
    """Snakemake through the SLURM profile, in the background, output to ``log``."""
    # The target first: options such as --configfile and --set-resources take every value that follows.
    cmd = [sys.executable, "-m", "snakemake", target, "--snakefile", str(REPO / "Snakefile"),
           "--profile", str(PROFILE), "--directory", str(workdir), "--configfile", str(configfile),
           *args, *TEST_CLUSTER_ARGS]
    with open(log, "w") as out:
        # Its own process group, so stopping it never signals pytest.
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env_with_src(),
                                start_new_session=True)


def jobs_in(workdir: Path) -> list[tuple[str, str]]:
    """(job id, state) of the SLURM jobs submitted from ``workdir`` that squeue still knows (for MinJobAge s)."""
    out = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%T|%Z"], capture_output=True, text=True,
                         timeout=30).stdout
    jobs = [(i, s) for i, s, d in (line.split("|", 2) for line in out.splitlines()) if Path(d) == workdir]
    return sorted(jobs, key=lambda job: int(job[0]))  # in submission order


def stop(proc: subprocess.Popen, workdir: Path) -> None:
    """SIGINT (Snakemake cancels its SLURM jobs; SIGTERM would wait for them), then cancel any job left."""
    for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGINT, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    live = [i for i, s in jobs_in(workdir) if s in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")]
    if live:
        subprocess.run(["scancel", *live], timeout=30)


@pytest.fixture(scope="module")
def cluster():
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """Starts the time-limit run and the micro study on SLURM, runs the micro study locally meanwhile."""
    root = tmp_path_factory.mktemp("slurm")

    timeout_dir = root / "timeout"
    timeout_dir.mkdir()
    long = micro_config()
    long["grid"]["modes"] = ["learned"]
    # Far more tokens than a minute allows on any machine; snapshots only at 0 and the end, so a resume
    # from any other point can only come from the checkpoint written on SIGTERM.
    long["scales"]["tiny"]["train"] |= {"total_tokens": 256 * 10**6, "checkpoint_every_tokens": 256 * 10**6,
                                        "val_every_tokens": 256 * 10**6,
                                        "keep_snapshots": "all"}  # one training job: the first to time out
    long["scales"]["tiny"]["resources"] = {"train": {"mem_mb": 500, "runtime": 1}}
    timeout_cfg = write_config(timeout_dir / "study.yaml", long)
    # Its data is prepared here (a second data job would only wait for a CPU); Snakemake keeps it.
    prepare(qconfig.load(long)["data"], timeout_dir / "results" / "data")

    micro = micro_config()
    micro["grid"]["modes"] = ["learned", "none"]
    micro["scales"]["tiny"]["train"]["checkpoint_every_tokens"] = 2048  # probes at 0 and 2048 tokens
    micro["scales"]["tiny"]["resources"] = {"train": {"mem_mb": 500, "runtime": 10},
                                            "probe": {"mem_mb": 500, "runtime": 10}}
    slurm_dir, local_dir = root / "on_slurm", root / "local"
    slurm_dir.mkdir()
    local_dir.mkdir()
    micro_cfg = write_config(root / "micro.yaml", micro)

    started: list[tuple[subprocess.Popen, Path]] = []
    try:
        timeout_proc = slurm_snakemake(timeout_dir, timeout_cfg, f"results/runs/{CELL}/train.json",
                                       "--retries", "5", log=timeout_dir / "snakemake.log")
        started.append((timeout_proc, timeout_dir))
        micro_proc = slurm_snakemake(slurm_dir, micro_cfg, "aggregate", log=slurm_dir / "snakemake.log")
        started.append((micro_proc, slurm_dir))
        run_snakemake(local_dir, micro_cfg, "aggregate")
        micro_proc.wait(timeout=600)
        yield {"slurm_dir": slurm_dir, "local_dir": local_dir, "micro_rc": micro_proc.returncode,
               "timeout_dir": timeout_dir, "timeout_proc": timeout_proc}
    finally:
        for proc, workdir in started:
            stop(proc, workdir)


def read_tables(results: Path) -> dict[str, pd.DataFrame]:
    return {p.name: pd.read_csv(p) for p in sorted((results / "tables").glob("*.csv"))}


def probe_values(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a probe file by its HDF5 path."""
    values = {}

    def take(name, obj):
        if isinstance(obj, h5py.Dataset):
            values[name] = obj[()]

    with h5py.File(path, "r") as f:
        f.visititems(take)
    return values


def test_micro_study_on_slurm_equals_the_local_run(runs):
    slurm_dir, local_dir = runs["slurm_dir"], runs["local_dir"]
    log = (slurm_dir / "snakemake.log").read_text()
    assert runs["micro_rc"] == 0, log[-5000:]

    # The jobs went through sbatch (one SLURM log per job), the local rules did not.
    slurm_logs = slurm_dir / ".snakemake" / "slurm_logs"
    # per cell: segment 0 (the snapshot at 0 tokens), then `train`, the last segment
    for rule, n in (("data", 1), ("segment", 2), ("train", 2), ("probe", 4), ("aggregate", 1)):
        assert len(list((slurm_logs / f"rule_{rule}").rglob("*.log"))) == n, rule
    assert not (slurm_logs / "rule_cell_settings").exists()
    assert [state for _, state in jobs_in(slurm_dir)] == ["COMPLETED"] * 10

    local, remote = read_tables(local_dir / "results"), read_tables(slurm_dir / "results")
    assert remote.keys() == local.keys() and "probes.csv" in local
    for name, table in local.items():
        keep = [c for c in table.columns if c not in TIMING_COLUMNS]
        pd.testing.assert_frame_equal(remote[name][keep], table[keep], check_exact=True, obj=name)

    probes = sorted((local_dir / "results" / "runs").rglob("probe/*.h5"))
    assert len(probes) == 4
    for path in probes:
        expected = probe_values(path)
        got = probe_values(slurm_dir / path.relative_to(local_dir))
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{path.name}:{name}")


def test_training_killed_at_its_time_limit_resumes_on_retry(runs):
    workdir, proc = runs["timeout_dir"], runs["timeout_proc"]
    resumed, deadline = None, time.monotonic() + 300
    while True:
        text = train_log(workdir / "results", CELL)  # the cell's segments' logs and the last one's
        if m := re.search(r"resumed from (\S+) at ([\d,]+) tokens", text):
            resumed = (m[1], int(m[2].replace(",", "")))
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(1)
    states = [s for _, s in jobs_in(workdir)]
    snakemake_log = (workdir / "snakemake.log").read_text()
    stop(proc, workdir)

    assert resumed is not None, f"no resumed attempt; squeue states {states}\n{snakemake_log[-4000:]}"
    assert states[0] == "TIMEOUT", states  # the first attempt was ended by SLURM's time limit
    assert re.search(r"SLURM status is: 'TIMEOUT'", snakemake_log)
    # The failed attempts' logs as Snakemake shows them (show-failed-logs): what each wrote on SIGTERM.
    # (While the other run kept the machine busy, more than one attempt may have timed out.)
    # Each attempt names its checkpoint in its log and in the launcher's closing line (qkrank.launch), and
    # each attempt gets further than the one before: one distinct token count per attempt.
    written = [int(n.replace(",", "")) for n in
               re.findall(r"resume checkpoint written at ([\d,]+) tokens", snakemake_log)]
    checkpointed = list(dict.fromkeys(written))
    assert checkpointed and 0 < checkpointed[0] and checkpointed == sorted(checkpointed), written
    assert len(checkpointed) == sum(s == "TIMEOUT" for s in states)
    path, tokens = resumed
    # Resumed from the checkpoint the last killed attempt wrote on SIGTERM: never from zero.
    assert tokens == checkpointed[-1] and path.endswith(f"resume/{tokens}.pt")
