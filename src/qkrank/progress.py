"""Live progress in tokens: a tqdm bar on a terminal, otherwise a plain line every ``every_s`` seconds.

Batch logs (SLURM, Snakemake ``log:``) get the plain lines, which stay readable without carriage returns.
Used by the data stage (tokens written) and by training (tokens seen, through ``qkrank.metrics.Progress``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm


class TokenBar:
    """Counts tokens; ``advance`` moves the bar, or prints ``line()`` when a plain line is due."""

    def __init__(self, name: str, total: int | None, initial: int = 0, *, enabled: bool = True,
                 tty: bool | None = None, every_s: float = 30.0, stream=None):
        self.name, self.total, self.every_s, self.enabled = name, total, every_s, enabled
        self.stream = stream or sys.stderr
        tty = self.stream.isatty() if tty is None else tty
        self.bar = tqdm(total=total, initial=initial, unit="tok", unit_scale=True, dynamic_ncols=True,
                        desc=name, file=self.stream, disable=not (enabled and tty))
        self.start = self._last_line = time.perf_counter()

    def advance(self, n: int, line: Callable[[], str], postfix: dict | None = None, force_line: bool = False) -> None:
        """Add ``n`` tokens; ``line`` is called only when a plain line is printed (now, if ``force_line``)."""
        if not self.enabled:
            return
        if not self.bar.disable:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            return
        if force_line or time.perf_counter() - self._last_line >= self.every_s:
            self.line(line())

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
