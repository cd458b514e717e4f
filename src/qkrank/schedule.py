"""Snapshot (probe) schedules in tokens: explicit points, a fixed interval and log-spaced points, mixed.

``train.checkpoints`` (workflow/schemas/config.schema.yaml) takes any of::

    tokens: [4000000, 16000000]                       # explicit token counts
    every: 1966080                                    # every N tokens
    log: {first: 262144, per_decade: 4, until: 16000000}   # first · 10^(k / per_decade), k = 0, 1, ...

The union of all of them, plus 0 and ``train.total_tokens`` (always included), is the schedule. Every
point is snapped to the nearest whole optimizer step (ties round up); a schedule that cannot be snapped
(a point outside [0, total_tokens], an interval that is not a whole number of steps, a log start below
one step) raises ScheduleError naming the field and the nearest valid values. Pure: no torch, no files.
"""

from __future__ import annotations

import math


class ScheduleError(ValueError):
    """A schedule that cannot be turned into whole optimizer steps; the message names the field."""


def snap(tokens: float, step: int) -> int:
    """The multiple of ``step`` nearest to ``tokens`` (a tie goes up)."""
    return int(math.floor(tokens / step + 0.5)) * step


def _neighbours(value: float, step: int, low: int, high: int) -> str:
    """The valid values (multiples of ``step`` within [low, high]) on either side of ``value``, as text."""
    below = max(low, min(high, math.floor(value / step) * step))
    above = max(low, min(high, below + step))
    return " or ".join(str(v) for v in sorted({below, above}))


def log_points(first: int, per_decade: int, until: int) -> list[float]:
    """first · 10^(k / per_decade) for k = 0, 1, ... up to ``until`` (unsnapped)."""
    points, k = [], 0
    while True:
        # Rounded to absorb float error in 10^(k/p) (e.g. 1e6 · 10^(4/4) = 9999999.999...).
        value = round(first * 10 ** (k / per_decade), 6)
        if value > until:
            return points
        points.append(value)
        k += 1


def checkpoint_tokens(schedule: dict | None, every: int | None, total: int, step: int,
                      where: str = "train") -> list[int]:
    """Sorted snapshot token counts of one cell.

    ``schedule`` is ``train.checkpoints`` (or None), ``every`` the ``train.checkpoint_every_tokens`` shorthand
    (or None), ``total`` the run's tokens and ``step`` the tokens per optimizer step. ``where`` prefixes field
    names in errors (e.g. ``scales.1.5b.train``).
    """
    if total % step:
        raise ScheduleError(f"config field '{where}.total_tokens': {total} is not a whole number of optimizer "
                            f"steps ({step} tokens); nearest valid values: {_neighbours(total, step, step, 10**30)}")
    schedule = schedule or {}
    points = {0, total}
    intervals = [(f"{where}.checkpoint_every_tokens", every)] if every is not None else []
    if schedule.get("every") is not None:
        intervals.append((f"{where}.checkpoints.every", schedule["every"]))
    for field, interval in intervals:
        if interval < step or interval % step:
            raise ScheduleError(f"config field '{field}': {interval} is not a whole number of optimizer steps "
                                f"({step} tokens); nearest valid values: "
                                f"{_neighbours(interval, step, step, max(step, total))}")
        points.update(range(0, total + 1, interval))
    for i, value in enumerate(schedule.get("tokens") or []):
        field = f"{where}.checkpoints.tokens[{i}]"
        if not 0 <= value <= total:
            raise ScheduleError(f"config field '{field}': {value} is outside the run (0 … total_tokens {total}); "
                                f"nearest valid values: {_neighbours(value, step, 0, total)}")
        points.add(snap(value, step))
    log = schedule.get("log")
    if log is not None:
        first, per_decade = log["first"], log["per_decade"]
        until = log.get("until") or total
        if first < step:
            raise ScheduleError(f"config field '{where}.checkpoints.log.first': {first} is below one optimizer "
                                f"step ({step} tokens); nearest valid values: {step}")
        if first > total:
            raise ScheduleError(f"config field '{where}.checkpoints.log.first': {first} exceeds total_tokens "
                                f"{total}; nearest valid values: {_neighbours(first, step, step, total)}")
        if until > total:
            raise ScheduleError(f"config field '{where}.checkpoints.log.until': {until} exceeds total_tokens "
                                f"{total}; nearest valid values: {total} (or leave it out)")
        points.update(min(total, snap(p, step)) for p in log_points(first, per_decade, until))
    return sorted(points)


def points_before(marks: list[int], tokens: int) -> int:
    """How many snapshot points lie in [0, tokens] (0 included)."""
    return sum(1 for m in marks if m <= tokens)
