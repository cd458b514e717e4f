"""Bad inputs fail before any expensive work, name the field or path and what would be valid, leave nothing.

Most go through ``qkrank.config.load`` (what the workflow runs at parse time); some through ``snakemake -n``
(checks that need the file system: corpus files, results_dir); a few through the stage CLIs (what the data
on disk or a checkpoint says, which no config can know).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import env_with_src, micro_config, run_snakemake, write_config

from qkrank import config as qconfig
from qkrank.checkpoint import atomic_save
from qkrank.data import sha256_file

CELL = "tiny/learned/muon/seed0"


def changed(path: str, value, *more: tuple[str, object]) -> dict:
    """The micro config with dotted fields set (created if absent): ``path`` = ``value``, then each of ``more``."""
    cfg = micro_config()
    for dotted, new in ((path, value), *more):
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = new
    return cfg


def with_override(overrides: dict) -> dict:
    return micro_config(cell_overrides=overrides)


# (what is wrong, config, field named in the message, what the message offers as valid)
BAD_CONFIGS = [
    ("results_dir of the wrong type", changed("results_dir", 5), "results_dir", "of type 'string'"),
    ("misspelt top-level key", {**micro_config(), "reslts_dir": "x"}, "reslts_dir", "valid keys here: ['aggregate'"),
    ("unknown key in train", changed("scales.tiny.train.lr", 0.1), "scales.tiny.train.lr", "'total_tokens'"),
    ("negative seed", changed("grid.seeds", [-1]), "grid.seeds.0", "minimum of 0"),
    ("non-integer seed", changed("grid.seeds", ["one"]), "grid.seeds.0", "of type 'integer'"),
    ("duplicate seeds", changed("grid.seeds", [0, 0]), "grid.seeds", "non-unique"),
    ("unknown mode", changed("grid.modes", ["sometimes"]), "grid.modes.0", "'learned'"),
    ("unknown optimizer", changed("grid.optimizers", ["sgd"]), "grid.optimizers.0", "'muon'"),
    ("unknown scale", changed("grid.scales", ["huge"]), "grid.scales", "defined under 'scales': ['tiny']"),
    ("unknown preset", changed("scales.tiny.model.preset", "7b"), "scales.tiny.model.preset", "'1.5b'"),
    ("negative total tokens", changed("scales.tiny.train.total_tokens", -256), "scales.tiny.train.total_tokens",
     "minimum of 1"),
    ("fractional total tokens", changed("scales.tiny.train.total_tokens", 2048.5), "scales.tiny.train.total_tokens",
     "of type 'integer'"),
    ("zero checkpoint interval", changed("scales.tiny.train.checkpoint_every_tokens", 0),
     "scales.tiny.train.checkpoint_every_tokens", "minimum of 1"),
    ("interval not a multiple of a step", changed("scales.tiny.train.checkpoint_every_tokens", 700),
     "scales.tiny.train.checkpoint_every_tokens", "nearest valid values: 512 or 768"),
    ("interval not dividing the run", changed("scales.tiny.train.checkpoint_every_tokens", 768),
     "scales.tiny.train.total_tokens", "nearest valid values: 1536 or 2304"),
    ("warmup longer than the run", changed("scales.tiny.optim.schedule", {"warmup_tokens": 4096}),
     "scales.tiny.optim.schedule.warmup_tokens", "exceeds train.total_tokens 2048"),
    ("train sequence beyond the model's context",
     changed("scales.tiny.train.seq_len", 512, ("scales.tiny.train.micro_batch", 1)),
     "scales.tiny.train.seq_len", "use at most 256"),
    ("probe sequence beyond the model's context", changed("scales.tiny.probe.seq_len", 300),
     "scales.tiny.probe.seq_len", "use at most 256"),
    ("validation data shorter than a sequence", changed("data.val_tokens", 32), "data.val_tokens",
     "use at least 65"),
    ("model vocabulary smaller than the tokenizer's", changed("scales.tiny.model.vocab_size", 300),
     "scales.tiny.model.vocab_size", "use at least 512"),
    ("heads not dividing the width", changed("scales.tiny.model.n_heads", 3), "scales.tiny.model",
     "not divisible by n_heads 3"),
    ("validation fraction of 1.5", changed("data.val_fraction", 1.5), "data.val_fraction", "maximum of 1"),
    ("micro-batch not divisible by processes", changed("scales.tiny.train.nproc", 3), "scales.tiny.train.micro_batch",
     "not divisible by train.nproc 3"),
    ("cell override for a cell not in the grid", with_override({"tiny/learned/muon/seed7": {}}),
     "cell_overrides.tiny/learned/muon/seed7", "cells: ['tiny/frozen/muon/seed0'"),
    ("cell override with an unknown field", with_override({CELL: {"train": {"learning_rate": 1}}}),
     f"cell_overrides.{CELL}.train.learning_rate", "valid keys here"),
    ("cell override of the wrong type", with_override({CELL: {"train": {"micro_batch": "four"}}}),
     f"cell_overrides.{CELL}.train.micro_batch", "of type 'integer'"),
    # issue 14: what used to fail late, be silently changed, or run
    ("results_dir with a shell command", changed("results_dir", "res;touch PWNED;echo"), "results_dir",
     "use letters, digits, spaces"),
    ("results_dir with a wildcard brace", changed("results_dir", "res{x}"), "results_dir", "contains '{}'"),
    ("results_dir climbing out", changed("results_dir", "../elsewhere"), "results_dir", "climbs out"),
    ("aggregate layer beyond the model", changed("aggregate.depths", [0, 7]), "aggregate.depths",
     "layer 7 does not exist in scale 'tiny' (2 layers); use -2 … 1"),
    ("empty corpus file list", changed("data.source", "files"), "data.files.paths", "list at least one file"),
    ("empty dataset list", changed("data.source", "hf"), "data.hf.sources", "list at least one dataset"),
    ("override probing one mode on another batch", with_override({"tiny/none/muon/seed0": {"train": {"seq_len": 32}}}),
     "cell_overrides.tiny/none/muon/seed0", "changes probe.seq_len (32 vs 64)"),
    ("override changing one mode's architecture",
     with_override({"tiny/frozen/muon/seed0": {"model": {"n_layers": 3}}}),
     "cell_overrides.tiny/frozen/muon/seed0", "model.n_layers"),
]


@pytest.mark.parametrize("what,cfg,field,valid", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_names_field_and_valid_values(what, cfg, field, valid, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(qconfig.ConfigError) as err:
        qconfig.load(copy.deepcopy(cfg))
    message = str(err.value)
    assert f"config field '{field}" in message and valid in message, message
    assert not list(tmp_path.iterdir()), "checking a config writes nothing"


def test_bad_config_file_is_named():
    with pytest.raises(qconfig.ConfigError, match="config file /no/such/study.yaml does not exist"):
        qconfig.load("/no/such/study.yaml")


def _files_corpus(tmp_path: Path, name: str, text: str | None) -> dict:
    """The micro config reading its corpus from local text files matching ``corpus/*.txt``."""
    if text is not None:
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / name).write_text(text)
    return changed("data", {"source": "files", "files": {"paths": ["corpus/*.txt"], "format": "text"},
                            "tokenizer": {"kind": "bpe", "vocab_size": 512}})


def _refused_by_workflow(tmp_path: Path, cfg: dict, *expected: str) -> None:
    configfile = write_config(tmp_path / "study.yaml", cfg)
    before = {p for p in tmp_path.rglob("*") if ".snakemake" not in p.parts}
    proc = run_snakemake(tmp_path, configfile, "-n", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for text in expected:
        assert text in output, output[-3000:]
    after = {p for p in tmp_path.rglob("*") if ".snakemake" not in p.parts}
    assert after == before, f"left behind: {sorted(after - before)}"


def test_workflow_refuses_a_missing_corpus_file(tmp_path):
    _refused_by_workflow(tmp_path, _files_corpus(tmp_path, "", None),
                         "data.files.paths", "no file matches 'corpus/*.txt'", "give existing text files")


def test_workflow_refuses_an_empty_corpus_file(tmp_path):
    _refused_by_workflow(tmp_path, _files_corpus(tmp_path, "empty.txt", ""),
                         "data.files.paths", "empty.txt is empty")


def test_workflow_refuses_an_unwritable_results_dir(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    _refused_by_workflow(tmp_path, changed("results_dir", "a_file/results"),
                         "results_dir", "is a file", "give a path inside a writable directory")


def _files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def _stage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env_with_src(),
                          timeout=300)


def test_data_stage_refuses_a_corpus_without_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _files_corpus(tmp_path, "blank.txt", "   \n\n  \n")  # not empty on disk, but no document in it
    configfile = write_config(tmp_path / "study.yaml", cfg)
    proc = _stage("qkrank.data", "--config", str(configfile), "--out", str(tmp_path / "data"))
    assert proc.returncode != 0
    assert "split is empty" in proc.stderr and "'files'" in proc.stderr, proc.stderr
    assert _files_in(tmp_path / "data") == []


def test_data_stage_refuses_a_vocabulary_larger_than_the_corpus_allows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Many short documents (so both splits get some) of few distinct words: BPE runs out of pairs far below 512.
    cfg = _files_corpus(tmp_path, "small.txt", "\n\n".join(f"ab ba ab {i % 3}" for i in range(400)))
    configfile = write_config(tmp_path / "study.yaml", cfg)
    proc = _stage("qkrank.data", "--config", str(configfile), "--out", str(tmp_path / "data"))
    assert proc.returncode != 0
    assert "config field 'data.tokenizer.vocab_size': 512 is more than this corpus allows" in proc.stderr, proc.stderr
    allowed = int(proc.stderr.split("use at most ")[1].split(",")[0])
    assert 257 <= allowed < 300, proc.stderr  # the byte alphabet and <|endoftext|>, plus a few merges
    assert _files_in(tmp_path / "data") == []


def test_train_stage_refuses_data_shorter_than_a_sequence(tmp_path, micro_data):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("tokenizer.json", "train.bin"):
        (data / name).write_bytes((micro_data / name).read_bytes())
    manifest = json.loads((micro_data / "manifest.json").read_text())
    short = np.fromfile(micro_data / "val.bin", dtype=manifest["dtype"])[:50]
    short.tofile(data / "val.bin")
    manifest["tokens"]["val"], manifest["sha256"]["val.bin"] = 50, sha256_file(data / "val.bin")
    (data / "manifest.json").write_text(json.dumps(manifest))
    configfile = write_config(tmp_path / "study.yaml", micro_config())
    run = tmp_path / "run"
    proc = _stage("qkrank.train", "--config", str(configfile), "--cell", CELL, "--data", str(data), "--out", str(run))
    assert proc.returncode != 0
    assert str(data / "val.bin") in proc.stderr and "fewer than one window of 65" in proc.stderr, proc.stderr
    assert _files_in(run) == []


def test_train_stage_refuses_a_checkpoint_from_another_config(tmp_path, micro_data):
    configfile = write_config(tmp_path / "study.yaml", micro_config())
    run = tmp_path / "run"
    foreign = run / "resume" / "512.pt"
    atomic_save({"config_hash": "0123456789abcdef", "tokens_seen": 512, "model": {"w": torch.zeros(1)}}, foreign)
    proc = _stage("qkrank.train", "--config", str(configfile), "--cell", CELL, "--data", str(micro_data),
                  "--out", str(run))
    assert proc.returncode != 0
    assert str(foreign) in proc.stderr and "written for config 0123456789abcdef" in proc.stderr, proc.stderr
    assert f"delete {run / 'resume'}" in proc.stderr
    assert _files_in(run) == [foreign], "nothing written beside the foreign checkpoint"
