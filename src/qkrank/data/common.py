"""Names every part of the data stage shares: the error type, file names, hashing and the split rule."""

from __future__ import annotations

import hashlib
from pathlib import Path

EOS = "<|endoftext|>"
SPLITS = ("train", "val")
FILES = ("tokenizer.json", "train.bin", "val.bin", "manifest.json")
TMP_PREFIX = ".tmp-data-"


class DataError(RuntimeError):
    """Missing, empty or corrupt data; the message names the path or field."""


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic document-level split: the first 8 bytes of sha256(id) as a uniform number."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    return u < val_fraction
