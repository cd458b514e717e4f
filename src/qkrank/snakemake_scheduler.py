"""One pending re-evaluation timer per Snakemake scheduler, instead of one more for every finished job.

Snakemake (9.x, with its default ``--max-jobs-per-timespan 100/1s``) ends every scheduling pass by starting a
timer that starts another pass a timespan later, and every finished job starts a pass too. Each finished job
therefore adds one more endless chain of timed passes (snakemake/snakemake#3744): after n jobs the scheduler
runs ≈ n passes per second whether or not anything changed. In the three-seed default study (≈ 170 jobs) the
Snakemake process spent 73 CPU-s of a 455 s run in those passes, 8 % of both cores, taken from the jobs.

:func:`coalesce_reevaluations` keeps the guarantee the timer exists for (a pass at most one timespan after
any pass, so rate-limited jobs still start) with at most one timer pending per scheduler. The Snakefile calls
it; with a Snakemake that has no such method it changes nothing.
"""

from __future__ import annotations

import threading
import time

PATCHED = "_qkrank_one_pending_timer"  # set on the patched method
PENDING = "_qkrank_pending_reevaluation"  # (timer, deadline) on a scheduler while its timer is pending


def one_pending_timer(schedule_original):
    """A ``_schedule_reevalutation(self, delay)`` that starts a timer only when none is pending that fires
    sooner (a shorter delay replaces a pending longer one, e.g. Snakemake's 10-s queue-input wait).

    The timer forgets itself before it releases the scheduler's semaphore, so the pass it starts always arms
    the next one; passes started by finished jobs while a timer is pending arm nothing. The timer is a daemon
    thread: Snakemake's exit does not wait for it (the stock timer holds every exit for up to a timespan)."""
    lock = threading.Lock()

    def schedule_reevaluation(self, delay) -> None:
        deadline = time.monotonic() + delay
        with lock:
            pending = getattr(self, PENDING, None)
            if pending is not None:
                if pending[1] <= deadline:
                    return
                pending[0].cancel()

            def fire() -> None:
                with lock:
                    pending = getattr(self, PENDING, None)
                    if pending is not None and pending[0] is timer:  # not replaced by a sooner one
                        setattr(self, PENDING, None)
                self._open_jobs.release()

            timer = threading.Timer(delay, fire)
            timer.daemon = True
            setattr(self, PENDING, (timer, deadline))
        timer.start()

    schedule_reevaluation.__wrapped__ = schedule_original
    setattr(schedule_reevaluation, PATCHED, True)
    return schedule_reevaluation


def coalesce_reevaluations() -> bool:
    """Patch Snakemake's JobScheduler (once per process); False where this Snakemake has nothing to patch."""
    try:
        from snakemake.scheduling.job_scheduler import JobScheduler
    except ImportError:
        return False
    original = getattr(JobScheduler, "_schedule_reevalutation", None)  # sic: Snakemake's spelling
    if original is None:
        return False
    if not getattr(original, PATCHED, False):
        JobScheduler._schedule_reevalutation = one_pending_timer(original)
    return True
