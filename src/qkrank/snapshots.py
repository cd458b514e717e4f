"""Where snapshots live, which outlive their probe, and the record each training segment leaves (torch-free).

The workflow trains a cell in segments, one per snapshot point (``python -m qkrank.train --until T``), so
each snapshot can be probed while training goes on. A segment writes:

- ``snapshots/temp/{T}.pt``: the snapshot (weights and metadata, what the probe reads) together with the
  whole resume state (optimizers, RNGs, metrics): what the next segment starts from, so the weights are on
  disk once. It is a Snakemake ``temp()`` output of this segment and an input of its probe and of the next
  segment, deleted once both are done. A kept one (``train.keep_snapshots``) is also written, weights only,
  to ``snapshots/{T}.pt``, which no rule deletes. The final snapshot is written straight to
  ``snapshots/{T}.pt``.
- ``segments/{T}.json``: tokens, step, sha256 and path of the snapshot: what its probe verifies, and the
  input of the next segment (so segments run in order). It stays when the snapshot is freed.

A freed snapshot comes back only by retraining the cell; when a probe of a finished cell must run again
without its snapshot, the workflow stops with ``freed_message`` (how to retrain) instead of retraining the
cell silently, and a probe job that gets there anyway fails with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from qkrank import config as qconfig
from qkrank.atomic import atomic_write_text

TEMP_DIR = "snapshots/temp"


class SnapshotError(RuntimeError):
    """A snapshot that is missing, freed or unrecorded; the message names the path and how to retrain."""


def sha256_file(path: Path) -> str:
    from qkrank.data import sha256_file as sha  # numpy-heavy module, kept out of the workflow's parse

    return sha(path)


def kept_path(run_dir: Path, tokens: int) -> Path:
    return Path(run_dir) / "snapshots" / f"{tokens}.pt"


def temp_path(run_dir: Path, tokens: int) -> Path:
    return Path(run_dir) / TEMP_DIR / f"{tokens}.pt"


def stamp_path(run_dir: Path, tokens: int) -> Path:
    return Path(run_dir) / "segments" / f"{tokens}.json"


def segment_start(run_dir: Path, until: int, settings: dict) -> tuple[int, Path] | None:
    """Where the segment ending at ``until`` starts: the previous snapshot point and its state file (None for the
    first segment, which starts from initialisation)."""
    marks = qconfig.checkpoint_tokens(settings)
    index = marks.index(until)
    return (marks[index - 1], temp_path(run_dir, marks[index - 1])) if index else None


def freed_message(run_dir: Path, tokens: int, settings: dict | None = None) -> str:
    keep = settings["train"].get("keep_snapshots", "final") if settings else "final"
    return (f"{kept_path(run_dir, tokens)}: the snapshot at {tokens:,} tokens was deleted once its probe file was "
            f"complete (train.keep_snapshots: {keep}), and only retraining the cell brings it back. To retrain "
            f"this cell: delete {Path(run_dir)} (its probe files go with it) and run the workflow again; to keep "
            f"snapshots for later re-probes, first set train.keep_snapshots to all or to a list that holds "
            f"{tokens} (docs/cluster.md, Disk)")


def check_segment(settings: dict, until: int | None) -> int:
    """The token count a run stops at: ``until`` (a snapshot point) or the end."""
    total = settings["train"]["total_tokens"]
    if until is None:
        return total
    marks = qconfig.checkpoint_tokens(settings)
    if until not in marks:
        nearest = sorted(sorted(marks, key=lambda m: (abs(m - until), m))[:2])
        raise qconfig.ConfigError(f"--until {until}: not a snapshot point of {settings['cell']['id']}; nearest "
                                  f"valid values: {' or '.join(map(str, nearest))}")
    return until


def finish_segment(run_dir: Path, tokens: int, step: int, path: Path, settings: dict) -> None:
    """Record the snapshot at ``tokens`` in ``segments/{tokens}.json`` (written last): the kept weights-only
    copy if there is one, else ``path``."""
    kept = tokens in qconfig.kept_snapshot_tokens(settings)
    target = kept_path(run_dir, tokens) if kept else path
    record = {"tokens": tokens, "step": step, "sha256": sha256_file(target), "kept": kept,
              "path": str(Path(target).relative_to(run_dir))}
    atomic_write_text(stamp_path(run_dir, tokens), json.dumps(record, indent=2) + "\n")


def read_stamp(run_dir: Path, tokens: int) -> dict | None:
    path = stamp_path(run_dir, tokens)
    return json.loads(path.read_text()) if path.exists() else None


def manifest_entries(run_dir: Path, settings: dict) -> tuple[dict, dict]:
    """train.json's ``snapshots`` (on disk: path, sha256) and ``freed_snapshots`` (sha256 only), by tokens."""
    kept, freed = {}, {}
    for tokens in qconfig.checkpoint_tokens(settings):
        path, stamp = kept_path(run_dir, tokens), read_stamp(run_dir, tokens)
        if path.exists():
            sha = stamp["sha256"] if stamp and stamp["kept"] else sha256_file(path)
            kept[str(tokens)] = {"path": f"snapshots/{tokens}.pt", "sha256": sha}
        elif stamp is not None:
            freed[str(tokens)] = {"sha256": stamp["sha256"], "step": stamp["step"]}
        else:
            raise SnapshotError(f"{path}: missing, and {stamp_path(run_dir, tokens)} has no record of it; "
                                  f"delete {Path(run_dir)} and run the workflow again to retrain the cell")
    return kept, freed


def locate(run_dir: Path, tokens: int) -> tuple[Path, str]:
    """The snapshot at ``tokens`` and its expected sha256, from its segment record or train.json."""
    run_dir = Path(run_dir)
    stamp = read_stamp(run_dir, tokens)
    manifest_path = run_dir / "train.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    entry = (manifest or {}).get("snapshots", {}).get(str(tokens))
    if entry is not None:
        return run_dir / entry["path"], entry["sha256"]
    if stamp is not None:
        path = run_dir / stamp["path"]
        if not path.exists():
            raise SnapshotError(freed_message(run_dir, tokens))
        return path, stamp["sha256"]
    if manifest is None:
        raise SnapshotError(f"{manifest_path} is missing: the cell has not finished training, and "
                              f"{stamp_path(run_dir, tokens)} is missing: no segment has reached {tokens} tokens")
    if str(tokens) in manifest.get("freed_snapshots", {}):
        raise SnapshotError(freed_message(run_dir, tokens))
    have = sorted(map(int, manifest["snapshots"]))
    raise SnapshotError(f"{manifest_path}: no snapshot at {tokens} tokens; have {have}")
