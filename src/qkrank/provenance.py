"""Which code produced a result: the qkrank version, the git commit of the source tree (and whether it had
uncommitted changes) and the torch version. Recorded in ``train.json`` and in every probe file's attributes.

At most one ``git`` call per process (cached), and only when the source tree is itself a git checkout: an
installed copy, a tarball or a machine without git gives ``None`` for the commit and its state.
"""

from __future__ import annotations

import functools
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from qkrank import __version__

SOURCE_ROOT = Path(__file__).resolve().parents[2]
_GIT_TIMEOUT_S = 10


def parse_git_status(porcelain: str) -> tuple[str | None, bool]:
    """(commit, dirty) from ``git status --porcelain=v2 --branch``; commit is None before the first commit."""
    commit, dirty = None, False
    for line in porcelain.splitlines():
        if line.startswith("# branch.oid "):
            oid = line.removeprefix("# branch.oid ").strip()
            commit = None if oid == "(initial)" else oid
        elif line and not line.startswith("#"):
            dirty = True
    return commit, dirty


def git_state(root: Path = SOURCE_ROOT) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout at ``root``; (None, None) when it is not one or git is unavailable.

    Untracked files do not make the tree dirty (results/ and caches live beside the code).
    """
    # Without this check, git would walk up from an installed copy and report an unrelated repository.
    if not (root / ".git").exists():
        return None, None
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
    try:
        proc = subprocess.run(["git", "-C", str(root), "status", "--porcelain=v2", "--branch",
                               "--untracked-files=no"], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S,
                              env=env, check=False)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if proc.returncode != 0:
        return None, None
    commit, dirty = parse_git_status(proc.stdout)
    return commit, (dirty if commit else None)


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@functools.cache
def provenance() -> dict:
    """{"qkrank_version", "git_commit", "git_dirty", "torch_version"}; unknown values are None."""
    commit, dirty = git_state()
    return {"qkrank_version": __version__, "git_commit": commit, "git_dirty": dirty,
            "torch_version": _package_version("torch")}


def hdf5_attributes() -> dict:
    """``provenance()`` as HDF5 attributes: an unknown value is left out (HDF5 has no null)."""
    return {k: v for k, v in provenance().items() if v is not None}
