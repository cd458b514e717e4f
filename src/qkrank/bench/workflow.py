"""Workflow overhead: ``snakemake -n`` wall time of a large grid from a fresh directory."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from qkrank.bench.core import GOALS, REPO_ROOT
from qkrank.bench.probe_cost import _child_env, _wall


def overhead_config(n_scales: int, n_seeds: int, n_checkpoints: int) -> dict:
    """A study of n_scales (tiny-shaped) × 3 modes × n_seeds with n_checkpoints probe points per cell."""
    step = 4 * 64
    scale = {"model": {"preset": "tiny", "vocab_size": 512, "n_layers": 1},
             "train": {"seq_len": 64, "micro_batch": 4, "checkpoint_every_tokens": step,
                       "total_tokens": step * (n_checkpoints - 1), "val_tokens": 256}}
    names = [f"s{i}" for i in range(n_scales)]
    return {"grid": {"scales": names, "modes": ["learned", "frozen", "none"], "seeds": list(range(n_seeds))},
            "data": {"tokenizer": {"vocab_size": 512}}, "scales": {name: scale for name in names}}


def workflow_overhead(work: Path, quick: bool) -> dict:
    """Wall time of ``snakemake -n`` over a large grid, from a fresh directory (nothing exists yet)."""
    import yaml

    snakefile = REPO_ROOT / "Snakefile"
    if not snakefile.exists():
        return {"skipped": f"no Snakefile at {snakefile} (qkrank installed without its workflow)"}
    shape = (1, 1, 3) if quick else (2, 5, 26)
    workdir = work / "dryrun"
    workdir.mkdir()
    configfile = workdir / "study.yaml"
    configfile.write_text(yaml.safe_dump(overhead_config(*shape)))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(snakefile), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", "1", "--quiet", "rules"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake -n failed ({proc.returncode}): {proc.stderr[-2000:]}")
    jobs = re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, re.MULTILINE)
    n_jobs = int(jobs.group(1)) if jobs else None
    startup = None if quick else _wall([sys.executable, "-m", "snakemake", "--version"])
    return {"grid": dict(zip(("scales", "seeds", "checkpoints"), shape, strict=True)) | {"modes": 3},
            "n_jobs": n_jobs, "dry_run_s": wall, "snakemake_version_s": startup,
            "dry_run_s_per_job": wall / n_jobs if n_jobs else None, "goal_s": GOALS["dry_run_s"]}
