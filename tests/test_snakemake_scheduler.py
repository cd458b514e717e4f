"""The scheduler patch: one pending re-evaluation timer, so scheduling passes stop multiplying with jobs."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from qkrank import snakemake_scheduler

job_scheduler = pytest.importorskip("snakemake.scheduling.job_scheduler")
STOCK = job_scheduler.JobScheduler.__dict__["_schedule_reevalutation"]
STOCK = getattr(STOCK, "__wrapped__", STOCK)


class Loop:
    """A stand-in for Snakemake's scheduling loop: each pass acquires ``_open_jobs`` and ends by calling
    ``_schedule_reevalutation(delay)``; a finished job releases ``_open_jobs`` once, as Snakemake's does."""

    def __init__(self, schedule_reevaluation, delay: float):
        self._open_jobs = threading.Semaphore(0)
        self.schedule_reevaluation, self.delay = schedule_reevaluation, delay
        self.passes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self._open_jobs.acquire(timeout=0.05):
                continue
            self.passes += 1
            self.schedule_reevaluation(self, self.delay)

    def passes_over(self, seconds: float, finished_jobs: int) -> int:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        self._open_jobs.release()  # the first pass
        for _ in range(finished_jobs):  # jobs finish early on: each releases one pass
            time.sleep(seconds / (4 * finished_jobs))
            self._open_jobs.release()
        time.sleep(seconds * 3 / 4)
        self.stop.set()
        thread.join()
        return self.passes


def test_stock_passes_multiply_with_finished_jobs_and_patched_ones_do_not():
    # Known truth: every release starts a chain of one pass per delay. Stock: 1 + 20 chains over 1 s at
    # 0.05 s ≈ 21 × 15 passes. Patched: one chain (≈ 20 timed passes) plus the 20 jobs' own passes.
    seconds, delay, jobs = 1.0, 0.05, 20
    bound = jobs + seconds / delay + 5
    patched = Loop(snakemake_scheduler.one_pending_timer(STOCK), delay).passes_over(seconds, jobs)
    assert seconds / delay / 4 <= patched <= bound  # the timer keeps re-arming, and only once
    stock = Loop(STOCK, delay).passes_over(seconds, jobs)
    if stock <= bound:
        pytest.skip(f"this Snakemake's own timer no longer multiplies passes ({stock}): the patch is not needed")
    assert stock > 2 * bound


def test_a_pass_still_follows_any_pass_within_one_delay():
    loop = Loop(snakemake_scheduler.one_pending_timer(STOCK), 0.05)
    schedule = loop.schedule_reevaluation
    for _ in range(10):  # ten passes in a row arm a single timer
        schedule(loop, loop.delay)
    assert loop._open_jobs.acquire(timeout=1.0)
    assert not loop._open_jobs.acquire(timeout=0.2)
    schedule(loop, loop.delay)  # the timer has fired and forgotten itself: the next pass arms a new one
    assert loop._open_jobs.acquire(timeout=1.0)


def test_a_sooner_request_replaces_a_later_pending_timer():
    loop = Loop(snakemake_scheduler.one_pending_timer(STOCK), 0.05)
    loop.schedule_reevaluation(loop, 30.0)  # e.g. Snakemake's wait for queue input
    waiting, _ = getattr(loop, snakemake_scheduler.PENDING)
    loop.schedule_reevaluation(loop, 0.05)  # a rate-limited pass wants one within a timespan
    assert loop._open_jobs.acquire(timeout=1.0)
    assert waiting.finished.is_set()  # cancelled: it will not release a pass 30 s from now
    assert getattr(loop, snakemake_scheduler.PENDING) is None


def test_coalesce_patches_snakemake_once(monkeypatch):
    monkeypatch.setattr(job_scheduler.JobScheduler, "_schedule_reevalutation", STOCK)
    assert snakemake_scheduler.coalesce_reevaluations()
    patched = job_scheduler.JobScheduler._schedule_reevalutation
    assert getattr(patched, snakemake_scheduler.PATCHED) and patched.__wrapped__ is STOCK
    assert snakemake_scheduler.coalesce_reevaluations()
    assert job_scheduler.JobScheduler._schedule_reevalutation is patched


def test_without_the_method_nothing_is_patched(monkeypatch):
    monkeypatch.delattr(job_scheduler.JobScheduler, "_schedule_reevalutation")
    assert not snakemake_scheduler.coalesce_reevaluations()


SNAKEFILE = """
from qkrank.snakemake_scheduler import coalesce_reevaluations
coalesce_reevaluations()

rule all:
    input: expand("out/{i}.txt", i=range(24))

rule one:
    output: "out/{i}.txt"
    shell: "sleep 0.5; echo {wildcards.i} > {output}"
"""


def test_a_real_snakemake_run_makes_a_pass_per_job_and_about_one_a_second(tmp_path):
    # 24 jobs of 0.5 s on 2 cores: ≈ 6 s. Patched, one pass per finished job plus about one a second. Stock
    # Snakemake 9.27 adds a timed pass a second per finished job: 79 passes here against the patch's 29.
    (tmp_path / "Snakefile").write_text(textwrap.dedent(SNAKEFILE))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--verbose"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "out").glob("*.txt"))) == 24
    h, m, s = re.search(r"Elapsed time: (\d+):(\d+):([\d.]+)", proc.stderr).groups()
    seconds = 3600 * int(h) + 60 * int(m) + float(s)
    passes = proc.stderr.count("Ready jobs")  # Snakemake's debug line of every pass that has jobs to place
    assert passes <= 24 + 2 * seconds + 5
