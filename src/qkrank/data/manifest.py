"""The data stage as a whole: tokenizer, shards and ``manifest.json`` built in a temporary directory and
swapped into place atomically (all or nothing)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from qkrank import builtin_corpus
from qkrank import config as qconfig
from qkrank.data.common import FILES, SPLITS, TMP_PREFIX, DataError, sha256_file
from qkrank.data.shards import tokenize_splits
from qkrank.data.sources import Source, document_sources
from qkrank.data.tokenizer import build_tokenizer, eos_id, token_dtype
from qkrank.settings import DataSettings


def _check_counts(data: DataSettings, sources: list[Source], counts: dict) -> None:
    what = ", ".join(s.label for s in sources)
    wanted_of = {"train": data.train_tokens, "val": data.val_tokens}
    for split in SPLITS:
        n, wanted = counts[split], wanted_of[split]
        if n == 0:
            raise DataError(f"data: the {split} split is empty: source {data.source!r} ({what}) has no "
                            f"documents with text for it (val_fraction {data.val_fraction})")
        if wanted is not None and n < wanted:
            raise DataError(f"config field 'data.{split}_tokens': {wanted:,} requested, but source "
                            f"{data.source!r} ({what}) ran out after {n:,} {split} tokens; lower it to at "
                            f"most {n:,} or add data")


def remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary directories left by a killed run (Snakemake's lock keeps two runs from sharing ``out_dir``)."""
    for stale in out_dir.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def prepare(data: DataSettings | Mapping, out_dir: Path) -> dict:
    """Build tokenizer, train/val shards and manifest in ``out_dir``, atomically (all or nothing).

    ``data`` is the validated ``data`` section, as settings or as the mapping the config holds.
    """
    if not isinstance(data, DataSettings):
        data = DataSettings.from_dict(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    sources = document_sources(data)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir))
    try:
        tokenizer = build_tokenizer(data, sources)
        tokenizer.save(str(tmp / "tokenizer.json"))
        vocab = tokenizer.get_vocab_size()
        dtype = token_dtype(vocab)
        # num_proc is None only in a cell's copy of the data settings: then encode in this process.
        result = tokenize_splits(tokenizer, data, sources, tmp, dtype, data.num_proc or 1)
        _check_counts(data, sources, result["tokens"])
        manifest = {
            "source": data.source,
            "sources": [{"label": s.label, "weight": s.weight, **s.description,
                         "documents": result["documents"][s.label], "tokens": result["source_tokens"][s.label]}
                        for s in sources],
            "data_config": data.to_dict(),
            # num_proc changes how fast, not what: it is left out of the identity.
            "data_config_hash": qconfig.config_hash(data.identity()),
            "tokenizer": {**data.tokenizer.to_dict(), "vocab_size": vocab},
            "vocab_size": vocab,
            "eos_id": eos_id(tokenizer),
            "dtype": np.dtype(dtype).name,
            "tokens": result["tokens"],
            "sha256": {name: sha256_file(tmp / name) for name in ("tokenizer.json", "train.bin", "val.bin")},
            "versions": _versions(),
        }
        if data.source == "builtin":
            manifest["builtin_corpus_sha256"] = builtin_corpus.corpus_sha256()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # The old manifest goes first and the new one comes last: while files are being swapped there is
        # no manifest, so a reader never pairs one run's manifest with another run's shards.
        (out_dir / "manifest.json").unlink(missing_ok=True)
        for name in FILES:
            os.replace(tmp / name, out_dir / name)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("datasets", "tokenizers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out
