"""Shared fixtures: a micro study config, prepared data, and running the real workflow in a temp dir."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# A few thousand tokens per cell, three modes: the true workflow in seconds.
MICRO_CONFIG = {
    "grid": {"scales": ["tiny"], "modes": ["learned", "frozen", "none"], "optimizers": ["muon"], "seeds": [0]},
    "data": {"source": "builtin", "tokenizer": {"kind": "bpe", "vocab_size": 512}},
    "scales": {
        "tiny": {
            "model": {"preset": "tiny", "vocab_size": 512, "n_layers": 2},
            "train": {"seq_len": 64, "micro_batch": 4, "total_tokens": 2048, "checkpoint_every_tokens": 512,
                      "val_tokens": 256},
            "probe": {"n_sequences": 4},
        }
    },
    "aggregate": {"marks_tokens": [1024, 2048]},
}


def micro_config(**overrides) -> dict:
    """A deep copy of the micro config; keyword overrides replace top-level sections."""
    cfg = copy.deepcopy(MICRO_CONFIG)
    cfg.update(copy.deepcopy(overrides))
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def copy_project(dest: Path, config: dict | None = None) -> Path:
    """A copy of the project as a user has it (Snakefile, config.yaml, environment.yml, profiles, workflow, src,
    configs) in ``dest``; ``config`` replaces its config.yaml."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".snakemake", "results")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "config.yaml", "environment.yml"):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("workflow", "src", "profiles", "configs"):
        shutil.copytree(REPO / folder, dest / folder, ignore=ignore)
    if config is not None:
        write_config(dest / "config.yaml", config)
    return dest


def train_log(results: Path, cell_id: str) -> str:
    """A cell's whole training log: its segments' logs in token order, then the last segment's (rule train)."""
    logs = results / "logs" / "train"
    segments = sorted((logs / cell_id).glob("*.log"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
    return "".join(p.read_text() for p in [*segments, logs / f"{cell_id}.log"] if p.is_file())


def env_with_src() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_snakemake(workdir: Path, configfile: Path, *args: str, snakefile: Path | None = None,
                  check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real workflow (this repo's Snakefile unless given) with ``workdir`` as working directory."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile or REPO / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(configfile), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_with_src(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    """Prepared token shards of the micro config (built once per test session)."""
    from qkrank import config as qconfig
    from qkrank.data import prepare

    out = tmp_path_factory.mktemp("micro_data")
    prepare(qconfig.load(micro_config())["data"], out)
    return out
