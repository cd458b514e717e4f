"""The per-cell training log (one CSV row per logged step, written atomically) and the live progress display."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from qkrank.atomic import atomic_write_text
from qkrank.progress import TokenBar

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


class Progress(TokenBar):
    """Training progress: tokens seen with loss and tokens/s (the bar or plain-line logic is ``TokenBar``'s)."""

    def __init__(self, name: str, total_tokens: int, tokens_seen: int, enabled: bool = True,
                 tty: bool | None = None, every_s: float = 30.0, stream=None):
        super().__init__(name, total_tokens, tokens_seen, enabled=enabled, tty=tty, every_s=every_s, stream=stream)

    def update(self, tokens_seen: int, step_tokens: int, loss: float, tokens_per_s: float,
               force_line: bool = False) -> None:
        """Advance by one optimizer step; ``force_line`` prints a plain line now (e.g. at a checkpoint)."""
        def line() -> str:
            return (f"{tokens_seen:,}/{self.total:,} tokens ({100 * tokens_seen / self.total:.1f}%), "
                    f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s")

        self.advance(step_tokens, line, {"loss": f"{loss:.3f}", "tok_s": f"{tokens_per_s:,.0f}"}, force_line)
