"""Provenance: the git commit and its state from a real repository, no git or no checkout, one call at most."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from qkrank import __version__, provenance

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(root), "PATH": os.environ["PATH"]})


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "code.py").write_text("x = 1\n")
    git(root, "add", "code.py")
    git(root, "commit", "-q", "-m", "one")
    return root


def head(root) -> str:
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_parse_git_status():
    sha = "a" * 40
    assert provenance.parse_git_status(f"# branch.oid {sha}\n# branch.head main\n") == (sha, False)
    changed = f"# branch.oid {sha}\n# branch.head main\n1 .M N... 100644 100644 100644 {sha} {sha} code.py\n"
    assert provenance.parse_git_status(changed) == (sha, True)
    assert provenance.parse_git_status("# branch.oid (initial)\n# branch.head main\n") == (None, False)


@needs_git
def test_git_state_of_a_real_checkout(repo):
    assert provenance.git_state(repo) == (head(repo), False)
    (repo / "notes.txt").write_text("untracked\n")
    assert provenance.git_state(repo) == (head(repo), False)  # untracked files (results/) are not changes
    (repo / "code.py").write_text("x = 2\n")
    assert provenance.git_state(repo) == (head(repo), True)
    git(repo, "commit", "-q", "-am", "two")
    assert provenance.git_state(repo) == (head(repo), False)


@needs_git
def test_no_checkout_no_git_gives_unknown(repo, tmp_path, monkeypatch):
    assert provenance.git_state(tmp_path / "plain") == (None, None)
    installed = repo / "site-packages"  # inside some repository, but not a checkout of its own
    installed.mkdir()
    assert provenance.git_state(installed) == (None, None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert provenance.git_state(repo) == (None, None)


def test_one_git_call_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(provenance, "git_state", lambda: calls.append(1) or ("b" * 40, True))
    provenance.provenance.cache_clear()
    try:
        first, second = provenance.provenance(), provenance.provenance()
    finally:
        provenance.provenance.cache_clear()
    assert first == second == {"qkrank_version": __version__, "git_commit": "b" * 40, "git_dirty": True,
                               "torch_version": first["torch_version"]}
    assert first["torch_version"] and calls == [1]


def test_hdf5_attributes_leave_unknowns_out(monkeypatch):
    monkeypatch.setattr(provenance, "git_state", lambda: (None, None))
    provenance.provenance.cache_clear()
    try:
        attrs = provenance.hdf5_attributes()
    finally:
        provenance.provenance.cache_clear()
    assert set(attrs) == {"qkrank_version", "torch_version"}


def test_train_json_and_probe_files_record_it(micro_data, tmp_path):
    import json
    import warnings

    import h5py
    from conftest import micro_config

    from qkrank import config as qconfig
    from qkrank.probe import ProbeWarning, probe_snapshot
    from qkrank.train import train_cell

    cfg = qconfig.load(micro_config(grid={"scales": ["tiny"], "modes": ["learned"], "seeds": [0]}))
    settings = qconfig.cell_settings(cfg, qconfig.cells(cfg)[0])
    run = tmp_path / "run"
    train_cell(settings, micro_data, run)
    expected = provenance.provenance()
    assert json.loads((run / "train.json").read_text())["provenance"] == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbeWarning)
        probe_snapshot(settings, micro_data, run, 0, run / "probe.h5")
    with h5py.File(run / "probe.h5") as f:
        recorded = {k: (f.attrs[k].item() if hasattr(f.attrs[k], "item") else f.attrs[k])
                    for k in expected if k in f.attrs}
    assert recorded == {k: v for k, v in expected.items() if v is not None}
    assert set(recorded) >= {"qkrank_version", "torch_version"}
