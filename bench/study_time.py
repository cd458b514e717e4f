#!/usr/bin/env python3
"""Where a finished study's time went, from the per-job benchmark files Snakemake wrote (results/benchmarks/).

    python bench/study_time.py [RESULTS_DIR] [--wall SECONDS] [--cores N]

Per kind of job (data, train, probe, aggregate; figures and summary have no benchmark file): jobs, summed
wall seconds and CPU seconds. With --wall (the study's measured wall time) it also prints the probes' share
of the study: probe job seconds ÷ (cores × wall), the figure issue 16 asks to keep at or under 10 %.
Standard library only, so it runs without the project installed.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from pathlib import Path

FORKED = re.compile(r"^qkrank: forked by \S+: ([0-9.]+) CPU-s", re.MULTILINE)


def forked_cpu_s(log: Path) -> float:
    """CPU seconds of a job the fork server ran, from the line the launcher ends its log with (Snakemake's
    benchmark measures the launcher, not the forked job); 0 for a job that ran as a process of its own."""
    try:
        found = FORKED.findall(log.read_text(errors="replace"))
    except OSError:
        return 0.0
    return float(found[-1]) if found else 0.0


def job_times(benchmarks: Path) -> dict[str, dict[str, float]]:
    """{kind: {"jobs", "s", "cpu_time"}}; kind = the first path part under benchmarks/ without its suffix.
    A job's CPU time is its benchmark's plus, where the fork server ran it, what its log (logs/ beside
    benchmarks/, the same relative path) says the forked job used."""
    logs = benchmarks.parent / "logs"
    out: dict[str, dict[str, float]] = {}
    for path in sorted(benchmarks.rglob("*.tsv")):
        kind = path.relative_to(benchmarks).parts[0].removesuffix(".tsv")
        with open(path) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows:
            continue
        row = rows[-1]  # one row per run of the job (repeat: 1)
        entry = out.setdefault(kind, {"jobs": 0, "s": 0.0, "cpu_time": 0.0})
        entry["jobs"] += 1
        entry["s"] += float(row["s"])
        entry["cpu_time"] += float(row.get("cpu_time") or 0.0)
        entry["cpu_time"] += forked_cpu_s(logs / path.relative_to(benchmarks).with_suffix(".log"))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="results", type=Path)
    parser.add_argument("--wall", type=float, help="the study's wall time in seconds")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    benchmarks = args.results / "benchmarks"
    if not benchmarks.is_dir():
        parser.error(f"{benchmarks} does not exist: run the study first")
    times = job_times(benchmarks)
    total = sum(t["s"] for t in times.values())
    print("| jobs | kind | wall s (summed) | CPU s (summed) | share of job seconds |")
    print("|---:|---|---:|---:|---:|")
    for kind, t in sorted(times.items(), key=lambda kv: -kv[1]["s"]):
        print(f"| {t['jobs']:.0f} | {kind} | {t['s']:.1f} | {t['cpu_time']:.1f} | {t['s'] / total:.1%} |")
    if args.wall:
        probe = times.get("probe", {"s": 0.0})["s"]
        print(f"\nprobe jobs ÷ ({args.cores} cores × {args.wall:.0f} s wall) = {probe / (args.cores * args.wall):.1%} "
              f"(goal ≤ 10 %); all benchmarked jobs ÷ (cores × wall) = {total / (args.cores * args.wall):.1%}")


if __name__ == "__main__":
    main()
