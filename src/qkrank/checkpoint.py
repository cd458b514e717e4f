"""Atomic checkpoint files, safe loading (``weights_only=True``) and resume-point discovery.

Two kinds live in a cell's run directory: ``snapshots/{tokens}.pt`` (model weights and metadata: what
probes read) and resume states (model, optimizers, schedule, RNG states, data position, tokens seen, config
hash, metrics so far: what a killed job or the next segment restarts from), whose float32 tensors are packed
losslessly (qkrank.state_packing). Both are written to a temporary name, fsynced and renamed into place, so a
file under its real name is always complete.
"""

from __future__ import annotations

import os
import pickle
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from qkrank import state_packing
from qkrank.atomic import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, unsafe or belongs to another config; the message names the path."""


class UnsafeCheckpointError(CheckpointError):
    """A readable file that holds more than tensors and plain containers (e.g. a code payload)."""


class ForeignCheckpointError(CheckpointError):
    """A readable checkpoint written under another config (another cell)."""


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync it, rename it into place, fsync the directory."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    # The rename itself must survive a node crash, or the directory could still show the old file set.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_state(state: dict, path: Path) -> None:
    """A resume state, its float32 tensors packed (a sixth smaller, the same bits), saved atomically."""
    atomic_save(state_packing.pack(state), path)


def safe_load(path: Path, map_location="cpu", mmap: bool = False) -> dict:
    """Load with ``weights_only=True``: tensors and plain containers only, never arbitrary pickle code.

    ``mmap``: tensors are read from the file when used (a probe reads the weights of a segment's state file
    and never its optimizer state)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    # A bare pickle (not torch's zip format) cannot be mapped: load it so weights_only judges its contents.
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it is not a plain-tensor checkpoint ({first_line}); qkrank never "
            f"writes such files, so delete it or find out who did") from None
    except Exception as e:  # a flipped byte in data.pkl surfaces as almost any exception type
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: {e})") from None


def read_state(path: Path, mmap: bool = False):
    """A checkpoint with its packed tensors unpacked (qkrank.state_packing); a plain one as it is."""
    try:
        return state_packing.unpack(safe_load(path, mmap=mmap))
    except state_packing.PackingError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_snapshot(path: Path) -> dict:
    """A snapshot's weights (unpacked) and metadata, from a kept snapshot or a segment state file; memory-mapped,
    so a segment state's optimizer part is never read."""
    snap = safe_load(path, mmap=True)
    try:
        return {**snap, "model": state_packing.unpack(snap["model"])}
    except state_packing.PackingError as e:
        raise CheckpointError(f"{path}: {e}") from None


def tokens_of(path: Path) -> int:
    return int(Path(path).stem)


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files named ``{tokens}.pt``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("*.pt") if p.stem.isdigit()]
    return sorted(found, key=tokens_of)


def load_state(path: Path, config_hash: str) -> dict:
    """A resume state (or a segment's state file) written for this config; ``state["path"]`` names the file.

    A readable checkpoint written under a different config is an error: resuming it would mix two cells.
    """
    # mmap: the packed file stays in the page cache, shared by DDP ranks, while each unpacks its own copy
    state = read_state(path, mmap=True)
    found = state.get("config_hash") if isinstance(state, dict) else None
    if found != config_hash:
        raise ForeignCheckpointError(
            f"{path}: written for config {found}, but this cell's config is {config_hash}; a changed "
            f"config is a different cell: delete {Path(path).parent} to start it afresh")
    state["path"] = str(path)
    return state


def latest_valid(directory: Path, config_hash: str, after: int | None = None) -> dict | None:
    """The newest loadable resume state whose config hash matches; truncated ones are skipped with a warning.

    ``after``: only states past that many tokens count (older ones belong to an earlier segment). A readable
    checkpoint written under a different config is an error, not silently skipped; so is a file that refuses
    to load safely: qkrank did not write it.
    """
    for path in reversed(list_checkpoints(directory)):
        if after is not None and tokens_of(path) <= after:
            break
        try:
            return load_state(path, config_hash)
        except (UnsafeCheckpointError, ForeignCheckpointError):
            raise
        except CheckpointError as e:
            warnings.warn(f"skipping corrupt resume checkpoint, falling back to the one before: {e}",
                          stacklevel=2)
    return None


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (all of them for 0)."""
    paths = list_checkpoints(directory)
    for path in paths[:len(paths) - keep]:
        path.unlink(missing_ok=True)


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and plain lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_state(model: torch.nn.Module, optimizers: dict, meta: dict, metrics: list[dict]) -> dict:
    """Everything a killed job needs to continue as if never stopped (``meta``: step, tokens, hashes, ...)."""
    return {"model": model.state_dict(), "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "rng": rng_state(), "metrics": metrics, **meta}


def restore(state: dict, model: torch.nn.Module, optimizers: dict) -> None:
    """Load a resume state into a freshly built model and its optimizers, and restore the RNGs."""
    path = state.get("path", "<resume state>")
    if set(state["optimizers"]) != set(optimizers):
        raise CheckpointError(f"{path}: holds optimizers {sorted(state['optimizers'])}, this cell builds "
                              f"{sorted(optimizers)}")
    model.load_state_dict(state["model"])
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    set_rng_state(state["rng"])
