"""Integrity checks of a study's artifacts: nothing corrupt is ever silently trusted.

``qkrank verify [--config X | --results DIR] [--hashes] [--fix]`` lists every bad file with its path and
why; with ``--fix`` it deletes what must be regenerated, so the next ``snakemake`` reruns exactly those jobs,
and rebuilds damaged token data in place (the same bytes), so that no finished cell retrains.
Cheap checks (sizes, headers, loadability) always run; ``--hashes`` also compares sha256 with the manifests
and reads every dataset of every probe file.
Nothing here runs while the workflow builds its DAG: a parse step would race with a running study. A file
that another process holds open (an HDF5 lock that cannot be taken) is reported as busy and never deleted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qkrank import layout
from qkrank import snapshots as qsnapshots

SPLITS = ("train", "val")
DTYPE_BYTES = {"uint16": 2, "uint32": 4, "int32": 4, "int64": 8}


@dataclass(frozen=True)
class Problem:
    """One bad file: ``path``, why, and the files whose deletion makes the workflow regenerate it."""

    path: Path
    reason: str
    remove: tuple[Path, ...] = field(default=())
    rebuild_data: bool = False  # token data: rebuilt in place by --fix (see rebuild_data)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# ---------------------------------------------------------------- data shards

def check_data(data_dir: Path, hashes: bool = False) -> list[Problem]:
    """Token shards against manifest.json: sizes always, sha256 with ``hashes``; absent data is no problem."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.exists():
        return []
    try:
        manifest = json.loads(manifest_path.read_text())
        itemsize = DTYPE_BYTES[manifest["dtype"]]
        tokens, sha = manifest["tokens"], manifest["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return [Problem(manifest_path, f"unreadable data manifest ({type(e).__name__}: {e})", rebuild_data=True)]
    problems = []
    for split in SPLITS:
        path = data_dir / f"{split}.bin"
        expected = tokens[split] * itemsize
        size = path.stat().st_size if path.exists() else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes"
            problems.append(Problem(path, f"{found}, the manifest says {expected} bytes ({tokens[split]} tokens × "
                                          f"{itemsize}); truncated or replaced", rebuild_data=True))
    names = ("tokenizer.json", *(f"{s}.bin" for s in SPLITS)) if hashes else ()
    for name in names:
        path = data_dir / name
        if path.exists() and not any(p.path == path for p in problems) and _sha256(path) != sha[name]:
            problems.append(Problem(path, "sha256 differs from manifest.json (corrupted)",
                                    rebuild_data=True))
    return problems


def rebuild_data(results: Path) -> Path:
    """Rebuild the token data of ``results`` in place from its config.json (the same bytes: the data stage is
    deterministic). Deleting it instead would make Snakemake retrain every cell: a data job that has to run
    reruns everything after it, even when the bytes come out the same."""
    from qkrank import config as qconfig
    from qkrank.data import prepare

    config = Path(results) / layout.CONFIG_JSON
    if not config.exists():
        raise FileNotFoundError(f"{config} is missing: cannot rebuild the data; delete {Path(results) / 'data'} "
                                f"and run snakemake (every cell will retrain)")
    data_dir = Path(results) / layout.DATA_DIR
    prepare(qconfig.load(config)["data"], data_dir)
    return data_dir


def _sha256(path: Path) -> str:
    from qkrank.data import sha256_file  # deferred: keeps verify free of the data stack until hashes are asked for

    return sha256_file(path)


# ---------------------------------------------------------------- checkpoints

def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` does not load as a plain-tensor checkpoint (``weights_only``, memory-mapped), or None."""
    import pickle
    import zipfile

    import torch

    try:
        # mmap: tensors are mapped, not read, so checking a 6 GB snapshot costs milliseconds.
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        return f"refused to load: not a plain-tensor checkpoint ({e})"
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        return f"unreadable or truncated checkpoint ({type(e).__name__}: {e})"
    return None


def aggregate_outputs(results: Path) -> tuple[Path, ...]:
    """What the aggregate job writes. Snakemake rebuilds a deleted file only when a job that reads it must run,
    so these go with a bad probe file or snapshot: the next run then re-aggregates, and rebuilds that file."""
    return layout.aggregate_outputs(results)


def check_run(run_dir: Path, hashes: bool = False) -> list[Problem]:
    """A cell's train.json, snapshots (loadable; sha256 with ``hashes``), resume states, metrics and probe files."""
    run_dir = Path(run_dir)
    tables = aggregate_outputs(layout.cell_of_run_dir(run_dir)[0])
    manifest_path, metrics_path = run_dir / "train.json", run_dir / "metrics.csv"
    retrain = (manifest_path, metrics_path, *tables)  # the train rule's outputs: deleting them reruns the cell
    problems = []
    if manifest_path.exists():
        try:
            snapshots = json.loads(manifest_path.read_text())["snapshots"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            problems.append(Problem(manifest_path, f"unreadable run manifest ({type(e).__name__}: {e})", retrain))
            snapshots = {}
        for _, entry in sorted(snapshots.items(), key=lambda kv: int(kv[0])):
            path = run_dir / entry["path"]
            why = "missing, though train.json lists it" if not path.exists() else checkpoint_problem(path)
            if why is None and hashes and _sha256(path) != entry["sha256"]:
                why = "sha256 differs from train.json (corrupted)"
            if why:
                problems.append(Problem(path, why, (path, *retrain)))
    for path in sorted((run_dir / "resume").glob("*.pt")) if (run_dir / "resume").is_dir() else ():
        why = checkpoint_problem(path)
        if why:
            problems.append(Problem(path, f"resume state: {why}", (path,)))
    temp_dir = run_dir / qsnapshots.TEMP_DIR
    for path in sorted(temp_dir.glob("*.pt")) if temp_dir.is_dir() else ():
        # A segment's end state (snapshot + resume state): deleting it with its record makes the workflow
        # train that segment again (and, where the state it started from was freed, the segments before it).
        record = qsnapshots.stamp_path(run_dir, int(path.stem)) if path.stem.isdigit() else path
        stamp = qsnapshots.read_stamp(run_dir, int(path.stem)) if path.stem.isdigit() else None
        why = checkpoint_problem(path)
        if why is None and hashes and stamp and not stamp["kept"] and _sha256(path) != stamp["sha256"]:
            why = f"sha256 differs from {record} (corrupted)"
        if why:
            problems.append(Problem(path, f"segment state: {why}", (path, record)))
    if metrics_path.exists():
        why = csv_problem(metrics_path, required=("tokens_seen",))
        if why:
            problems.append(Problem(metrics_path, why, retrain))
    for path in sorted((run_dir / "probe").glob("*.h5")) if (run_dir / "probe").is_dir() else ():
        if layout.probe_file_busy(path):
            print(f"qkrank verify: {path} is open in another process (locked); not checked", file=sys.stderr)
            continue
        why = probe_problem(path, deep=hashes)
        if why:
            problems.append(Problem(path, why, (path, *tables)))
    return problems


# ---------------------------------------------------------------- probe files and tables

def probe_problem(path: Path, deep: bool = False) -> str | None:
    """Why a probe HDF5 file cannot be trusted (layout's one check, without the path prefix), or None."""
    why = layout.probe_file_problem(path, deep=deep)
    return None if why is None else why.removeprefix(f"{path}: ")


def csv_problem(path: Path, required: tuple[str, ...] = ()) -> str | None:
    """Why a CSV table is unusable: unreadable, no header, a missing required column, or ragged rows."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return f"unreadable CSV ({type(e).__name__}: {e})"
    if not rows:
        return "empty CSV (no header)"
    header = rows[0]
    missing = [c for c in required if c not in header]
    if missing:
        return f"CSV header {header} lacks column(s) {missing}"
    ragged = next((i for i, row in enumerate(rows[1:], start=2) if len(row) != len(header)), None)
    if ragged is not None:
        return f"row {ragged} has {len(rows[ragged - 1])} fields, the header {len(header)} (truncated?)"
    return None


def check_tables(tables_dir: Path) -> list[Problem]:
    tables_dir = Path(tables_dir)
    problems = []
    for path in sorted(tables_dir.glob("*.csv")) if tables_dir.is_dir() else ():
        why = csv_problem(path)
        if why:
            problems.append(Problem(path, why, (path,)))
    for path in sorted(tables_dir.glob("*.md")) if tables_dir.is_dir() else ():
        if path.stat().st_size == 0:
            problems.append(Problem(path, "empty Markdown table", (path,)))
    return problems


# ---------------------------------------------------------------- whole study

def run_dirs(results: Path) -> list[Path]:
    """Every cell run directory ``runs/{scale}/{mode}/{optimizer}/seed{N}`` present under ``results``."""
    return sorted(p for p in (Path(results) / "runs").glob("*/*/*/seed*") if p.is_dir())


def check_results(results: Path, hashes: bool = False) -> list[Problem]:
    """Every artifact under a results directory."""
    results = Path(results)
    problems = check_data(results / "data", hashes)
    for run_dir in run_dirs(results):
        problems += check_run(run_dir, hashes)
    return problems + check_tables(results / "tables")


def fix(problems: list[Problem], results: Path | None = None) -> list[Path]:
    """Delete every file that must be regenerated, and rebuild damaged token data of ``results`` in place;
    returns the paths deleted or rebuilt."""
    deleted = []
    for problem in problems:
        for path in problem.remove:
            if path.exists() and path not in deleted:
                path.unlink()
                deleted.append(path)
    if results is not None and any(p.rebuild_data for p in problems):
        deleted.append(rebuild_data(results))
    return deleted


# ---------------------------------------------------------------- inputs checked before any job

def preflight(config: dict, workdir: Path | None = None) -> None:
    """Fail fast on inputs no schema can see: an unwritable results_dir, missing or empty corpus files."""
    from qkrank.config import ConfigError

    workdir = Path(workdir or Path.cwd())
    results = workdir / config["results_dir"]
    existing = next(p for p in (results, *results.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"config field 'results_dir': {results} cannot be created, {existing} is a file; "
                          f"give a path inside a writable directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"config field 'results_dir': {existing} is not writable; give a writable directory")
    data = config["data"]
    if data["source"] != "files":
        return
    for pattern in data["files"]["paths"]:
        matches = [m for m in corpus_matches(workdir, pattern) if m.exists()]
        if not matches:
            raise ConfigError(f"config field 'data.files.paths': no file matches {pattern!r} (relative to "
                              f"{workdir}); give existing {data['files']['format']} files or globs")
        for path in matches:
            if path.is_file() and path.stat().st_size == 0:
                raise ConfigError(f"config field 'data.files.paths': {path} is empty; the corpus needs text")


def corpus_matches(workdir: Path, pattern: str) -> list[Path]:
    """Paths a corpus pattern names, relative to ``workdir`` unless absolute (as the data stage reads them)."""
    if not any(c in pattern for c in "*?["):
        return [workdir / pattern]
    root = Path(pattern).anchor
    return sorted(Path(root).glob(pattern[len(root):])) if root else sorted(workdir.glob(pattern))


# ---------------------------------------------------------------- CLI

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="qkrank verify", description="Check every artifact of a study; list "
                                     "bad files; --fix deletes them so snakemake regenerates them.")
    parser.add_argument("--config", help="study config (its results_dir is checked); default config.yaml")
    parser.add_argument("--results", type=Path, help="results directory to check (instead of --config)")
    parser.add_argument("--hashes", action="store_true", help="also compare sha256 of shards and snapshots with "
                        "their manifests and read every probe dataset")
    parser.add_argument("--fix", action="store_true", help="delete bad files and what depends on them")
    args = parser.parse_args(argv)
    if args.results is None:
        from qkrank import config as qconfig

        try:
            args.results = Path(qconfig.load(args.config)["results_dir"])
        except qconfig.ConfigError as e:
            sys.exit(f"qkrank verify: error: {e}")
    if not args.results.is_dir():
        sys.exit(f"qkrank verify: error: results directory {args.results} does not exist")
    problems = check_results(args.results, hashes=args.hashes)
    for problem in problems:
        print(f"BAD {problem}")
    if not problems:
        print(f"qkrank verify: {args.results}: every artifact checked is sound"
              f"{' (sha256 included)' if args.hashes else ''}")
        return
    if args.fix:
        for path in fix(problems, args.results):
            print(f"rebuilt {path}" if path.is_dir() else f"deleted {path}")
        print(f"qkrank verify: {len(problems)} bad file(s) removed; run snakemake again to regenerate them")
        return
    sys.exit(f"qkrank verify: {len(problems)} bad file(s); rerun with --fix to delete them for regeneration")


if __name__ == "__main__":
    main()
