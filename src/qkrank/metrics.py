"""The per-cell training log: one row per logged step, written as CSV atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from qkrank.atomic import atomic_write_text

COLUMNS = ("tokens_seen", "step", "train_loss", "val_loss", "lr_muon", "lr_adamw", "grad_norm",
           "tokens_per_s", "wall_s")
# Columns that depend only on the computation, not on the machine's speed (compared across resumes).
DETERMINISTIC_COLUMNS = ("tokens_seen", "step", "train_loss", "val_loss", "lr_muon", "lr_adamw", "grad_norm")


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
    return buf.getvalue()


def write_csv(rows: list[dict], path: Path) -> None:
    atomic_write_text(path, rows_to_csv(rows))
