"""The per-cell training log (one CSV row per logged step, written atomically) and the live progress display."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

from tqdm import tqdm

from qkrank.atomic import atomic_write_text

COLUMNS = ("tokens_seen", "step", "train_loss", "val_loss", "lr_muon", "lr_adamw", "grad_norm",
           "tokens_per_s", "wall_s")
# Columns that depend only on the computation, not on the machine's speed (compared across resumes).
DETERMINISTIC_COLUMNS = ("tokens_seen", "step", "train_loss", "val_loss", "lr_muon", "lr_adamw", "grad_norm")


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:  # a misspelt key would otherwise vanish from the log without a trace
            raise ValueError(f"metrics row has unknown column(s) {sorted(unknown)}; columns: {list(COLUMNS)}")
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
    return buf.getvalue()


def write_csv(rows: list[dict], path: Path) -> None:
    atomic_write_text(path, rows_to_csv(rows))


class Progress:
    """A tqdm bar (tokens/s, loss, ETA) on a terminal; otherwise a plain line every ``every_s`` seconds.

    Batch logs (SLURM, Snakemake ``log:``) get the plain lines, which stay readable without carriage returns.
    """

    def __init__(self, name: str, total_tokens: int, tokens_seen: int, enabled: bool = True,
                 tty: bool | None = None, every_s: float = 30.0, stream=None):
        self.name, self.total, self.every_s = name, total_tokens, every_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        tty = self.stream.isatty() if tty is None else tty
        self.bar = tqdm(total=total_tokens, initial=tokens_seen, unit="tok", unit_scale=True, dynamic_ncols=True,
                        desc=name, file=self.stream, disable=not (enabled and tty))
        self._last_line = time.perf_counter()

    def update(self, tokens_seen: int, step_tokens: int, loss: float, tokens_per_s: float,
               force_line: bool = False) -> None:
        """Advance by one optimizer step; ``force_line`` prints a plain line now (e.g. at a checkpoint)."""
        if not self.enabled:
            return
        if not self.bar.disable:
            self.bar.update(step_tokens)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            return
        if force_line or time.perf_counter() - self._last_line >= self.every_s:
            self.line(f"{tokens_seen:,}/{self.total:,} tokens ({100 * tokens_seen / self.total:.1f}%), "
                      f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s")

    def line(self, text: str) -> None:
        """A message that must not be lost in the bar: printed above it, or as a plain line."""
        if not self.enabled:
            return
        if self.bar.disable:
            print(f"{self.name}: {text}", file=self.stream, flush=True)
        else:
            self.bar.write(f"{self.name}: {text}", file=self.stream)
        self._last_line = time.perf_counter()

    def close(self) -> None:
        self.bar.close()
