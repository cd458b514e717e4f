"""Probe cost: probe time ÷ training time of one checkpoint interval, peak RSS as probe tokens grow, and the
start-up a probe job pays before it works."""

from __future__ import annotations

import copy
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qkrank import forkserver
from qkrank.bench.core import GOALS, SRC_DIR
from qkrank.model import ModelConfig


def _bench_settings(quick: bool, threads: int, data: dict) -> dict:
    """Cell settings of the default study's ``tiny`` scale, trained for one checkpoint interval: the mean
    interval between its probe points, in whole optimizer steps."""
    from qkrank import config as qconfig

    study = qconfig.load(qconfig.DEFAULT_CONFIG_PATH)
    marks = qconfig.checkpoint_tokens(qconfig.cell_settings(study, qconfig.cells(study)[0]))
    scale = copy.deepcopy(study["scales"]["tiny"])
    scale.pop("cell", None)
    train = scale["train"]
    step = qconfig.tokens_per_step(train)
    train.pop("checkpoints", None)
    train["checkpoint_every_tokens"] = max(1, round(marks[-1] / (len(marks) - 1) / step)) * step
    if quick:
        train.update(micro_batch=4, grad_accum=1, seq_len=128, val_tokens=512)
        scale["model"]["vocab_size"] = data["tokenizer"]["vocab_size"]
        scale["probe"]["n_sequences"] = 4
        train["checkpoint_every_tokens"] = train["val_every_tokens"] = 2 * qconfig.tokens_per_step(train)
    interval = train["checkpoint_every_tokens"]
    if interval % train.get("val_every_tokens", interval):
        train["val_every_tokens"] = interval
    train.update(total_tokens=interval, threads=threads)
    scale["optim"]["schedule"]["warmup_tokens"] = 0
    scale["resources"] = {"train": {"cpus": threads}, "probe": {"cpus": threads}}
    config = {"grid": {"scales": ["tiny"], "modes": ["learned"], "optimizers": ["muon"], "seeds": [0]},
              "data": data, "scales": {"tiny": scale}}
    loaded = qconfig.load(config)
    return qconfig.cell_settings(loaded, qconfig.cells(loaded)[0])


def settings_model(settings: dict) -> dict:
    """ModelConfig fields of cell settings: the preset's row with the overrides and the cell's mode."""
    fields = {k: v for k, v in settings["model"].items() if k != "preset"}
    return ModelConfig.from_preset(settings["model"]["preset"], norm_mode=settings["cell"]["mode"],
                                   **fields).to_dict()


def _with_probe(settings: dict, **probe) -> dict:
    out = copy.deepcopy(settings)
    out["probe"].update(probe)
    return out


def probe_cost(work: Path, threads: int, quick: bool) -> tuple[dict, dict]:
    """Train one checkpoint interval and probe it, in-process; then probes of doubling size in fresh processes."""
    from qkrank import config as qconfig
    from qkrank.data import prepare
    from qkrank.probe import probe_snapshot, saves_activations
    from qkrank.train import train_cell

    study = qconfig.load(qconfig.DEFAULT_CONFIG_PATH)
    data_cfg = copy.deepcopy(study["data"])
    if quick:
        data_cfg["tokenizer"]["vocab_size"] = 512
    data_dir, run_dir = work / "data", work / "run"
    prepare(data_cfg, data_dir)
    settings = _bench_settings(quick, threads, data_cfg)
    interval = settings["train"]["checkpoint_every_tokens"]
    t0 = time.perf_counter()
    train_cell(settings, data_dir, run_dir)
    cell_s = time.perf_counter() - t0
    with open(run_dir / "metrics.csv") as f:
        # wall_s runs from the first step, so the interval excludes start-up and the validation at 0.
        train_s = float(list(csv.DictReader(f))[-1]["wall_s"])
    probe_s = {}
    for save_activations in (False, True):
        t0 = time.perf_counter()
        probe_snapshot(_with_probe(settings, save_activations=save_activations), data_dir, run_dir, interval,
                       work / f"probe_act{int(save_activations)}.h5")
        probe_s[save_activations] = time.perf_counter() - t0
    configured = settings["probe"]["save_activations"]
    probe_cfg = settings["probe"]
    probe_tokens = probe_cfg["n_sequences"] * (probe_cfg["seq_len"] or settings["train"]["seq_len"])
    uses_act = saves_activations(configured, ModelConfig(**settings_model(settings)), probe_tokens)
    cost = {
        "preset": "tiny", "threads": threads, "interval_tokens": interval,
        "tokens_per_step": qconfig.tokens_per_step(settings["train"]),
        "interval_train_s": train_s, "train_cell_wall_s": cell_s,
        "probe_tokens": probe_tokens,
        "probe_s_without_act": probe_s[False], "probe_s_with_act": probe_s[True],
        "configured_save_activations": configured, "saves_activations": uses_act,
        "probe_cost_ratio": probe_s[uses_act] / train_s,
        "probe_cost_ratio_without_act": probe_s[False] / train_s,
        "probe_cost_ratio_with_act": probe_s[True] / train_s,
        "what": "interval_train_s = wall_s of the last row of metrics.csv of qkrank.train.train_cell run for "
                "one interval (its steps and validations; start-up and the validation at 0 excluded); "
                "probe_s = qkrank.probe.probe_snapshot of the interval's snapshot (load, sha256, forward, "
                "spectra, HDF5); both in-process on the same threads",
        "goal": GOALS["probe_cost_ratio"],
    }
    cost["job"] = probe_job(work, settings, data_dir, run_dir, interval, min(probe_s[uses_act], _probe_again(
        settings, data_dir, run_dir, interval, work / "probe_again.h5")), repeats=1 if quick else 3)
    sizes = (2, 4) if quick else (8, 16, 32, 64)
    memory = probe_memory(work, settings, data_dir, run_dir, interval, sizes)
    memory["probe_help_wall_s"] = None if quick else _wall([sys.executable, "-m", "qkrank.probe", "--help"])
    return cost, memory


def _probe_again(settings: dict, data_dir: Path, run_dir: Path, tokens: int, out: Path) -> float:
    from qkrank.probe import probe_snapshot

    t0 = time.perf_counter()
    probe_snapshot(settings, data_dir, run_dir, tokens, out)
    return time.perf_counter() - t0


def probe_job(work: Path, settings: dict, data_dir: Path, run_dir: Path, tokens: int, work_s: float,
              repeats: int) -> dict:
    """What one workflow probe job (``python -m qkrank.probe --settings ...``) pays before and after its work:
    the job's wall time (best of ``repeats`` fresh processes) − the same probe's time in a warm process."""
    path = work / "settings_job.json"
    path.write_text(json.dumps(settings))
    cmd = [sys.executable, "-m", "qkrank.probe", "--settings", str(path), "--data", str(data_dir), "--run-dir",
           str(run_dir), "--tokens", str(tokens), "--out", str(work / "job.h5")]
    walls = [_wall(cmd) for _ in range(repeats)]
    startup = min(walls) - work_s
    launched = [sys.executable, "-m", "qkrank.launch", "--log", str(work / "job.log"), "--", *cmd[1:]]
    server = forkserver.start(work / "forkserver.log", _child_env())
    try:
        forkserver.wait_ready(server)
        forked_env = {**_child_env(), forkserver.ENV: str(server[1])}
        forked = [_wall(launched, env=forked_env) for _ in range(repeats)]
    finally:
        forkserver.stop(server)
    if "forked by" not in (work / "job.log").read_text():
        raise RuntimeError(f"the probe job was not forked by the server: {work / 'forkserver.log'}")
    forked_startup = min(forked) - work_s
    return {"job_wall_s": min(walls), "job_wall_s_all": walls, "work_s": work_s, "startup_s": startup,
            "startup_over_work": startup / work_s, "startup_share_of_job": startup / min(walls),
            "forked_job_wall_s": min(forked), "forked_job_wall_s_all": forked, "forked_startup_s": forked_startup,
            "forked_startup_over_work": forked_startup / work_s,
            "what": "job_wall_s = wall time of python -m qkrank.probe in a process of its own (best of the fresh "
                    "processes); forked_job_wall_s = the same job as the workflow runs it, through qkrank.launch "
                    "with a ready fork server; work_s = probe_snapshot of the same snapshot in a warm process "
                    "(best of two); startup_s = a job's wall time − work_s: interpreter, imports, settings "
                    "validation (forked: the launcher, the fork, qkrank's own imports)"}


_CHILD = """
import json, sys, time
from pathlib import Path
from qkrank.bench.probe_cost import peak_rss_reset, peak_rss_kb, current_rss_kb
from qkrank.probe import probe_snapshot
settings, data, run, tokens, out = json.loads(Path(sys.argv[1]).read_text()), *sys.argv[2:]
base = current_rss_kb(); reset = peak_rss_reset()
t0 = time.perf_counter()
probe_snapshot(settings, Path(data), Path(run), int(tokens), Path(out))
print(json.dumps({"probe_s": time.perf_counter() - t0, "rss_before_kb": base, "peak_rss_kb": peak_rss_kb(),
                  "peak_reset": reset}))
"""


def current_rss_kb() -> int:
    return _status_kb("VmRSS") or 0


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where /proc does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_kb() -> int:
    """Peak resident set size of this process in KiB (VmHWM; ru_maxrss where /proc is absent)."""
    import resource

    return _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _wall(cmd: list[str], env: dict | None = None, **kwargs) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env or _child_env(), **kwargs)
    return time.perf_counter() - t0


def probe_memory(work: Path, settings: dict, data_dir: Path, run_dir: Path, tokens: int, sizes) -> dict:
    """Peak RSS of a probe (save_activations false) as n_sequences doubles, each in a fresh process."""
    rows = []
    for n_sequences in sizes:
        path = work / f"settings_n{n_sequences}.json"
        path.write_text(json.dumps(_with_probe(settings, n_sequences=n_sequences, save_activations=False)))
        cmd = [sys.executable, "-c", _CHILD, str(path), str(data_dir), str(run_dir), str(tokens),
               str(work / f"mem_{n_sequences}.h5")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_child_env())
        wall = time.perf_counter() - t0
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"n_sequences": n_sequences, "probe_tokens": n_sequences * settings["train"]["seq_len"],
                     "peak_rss_mb": child["peak_rss_kb"] / 1024, "rss_before_mb": child["rss_before_kb"] / 1024,
                     "probe_peak_increase_mb": (child["peak_rss_kb"] - child["rss_before_kb"]) / 1024,
                     "peak_reset": child["peak_reset"], "probe_s": child["probe_s"], "job_wall_s": wall,
                     "job_startup_s": wall - child["probe_s"]})
    first, last = rows[0], rows[-1]
    return {"save_activations": False, "runs": rows,
            "peak_rss_ratio_last_over_first": last["peak_rss_mb"] / first["peak_rss_mb"],
            "tokens_ratio_last_over_first": last["probe_tokens"] / first["probe_tokens"],
            "job_startup_s_median": statistics.median(r["job_startup_s"] for r in rows),
            "job_startup_over_probe_s": statistics.median(r["job_startup_s"] / r["probe_s"] for r in rows),
            "what": "peak RSS (VmHWM reset just before the probe) of qkrank.probe.probe_snapshot in a fresh "
                    "python per size; job start-up = process wall time − in-process probe time"}
