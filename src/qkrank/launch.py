"""How the workflow starts every job: ``python -m qkrank.launch --log LOG -- ARGS...``.

Runs ``sys.executable ARGS...`` (the interpreter that runs this module, which the workflow takes from the
one running Snakemake) with stdout and stderr in LOG, and:

- keeps every attempt's log: Snakemake deletes LOG before each attempt, so LOG is also hard-linked to
  ``<LOG stem>.attempt<N>.log`` (no extra space), which survives the retry;
- dies with its Snakemake: Linux sends SIGTERM to the job when its parent dies (``PR_SET_PDEATHSIG``), so a
  kill -9 of snakemake alone leaves no training running without a parent (training checkpoints on SIGTERM);
- forwards SIGTERM and SIGUSR1 to the job (Ctrl-C's SIGINT reaches it from the terminal directly) and exits
  with its exit status (75: preempted, retry);
- keeps freed memory in the process (``GLIBC_TUNABLES``, unless set): no page-fault storm at every step;
- hands the job to the run's fork server where there is one (``qkrank.forkserver``: no torch import per job),
  and starts ``python`` itself otherwise;
- on failure, ends LOG and stderr with one line naming the cause: ``no space left on device: <dir>``, a
  GPU asked for where there is none, or the last line of the job's traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from qkrank import forkserver

PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
LOW_SPACE_BYTES = 64 << 20
DISK_FULL = re.compile(r"No space left on device|Errno 28|ENOSPC")
# What a full disk looks like when torch's zip writer or h5py hit it first.
FAILED_WRITE = re.compile(r"No space left on device while writing '([^']+)'")
MAYBE_DISK_FULL = re.compile(r"unexpected pos|PytorchStreamWriter failed|file write failed|Can't write data")
NO_GPU = re.compile(r"'cuda' requested but CUDA is not available|Torch not compiled with CUDA|no CUDA GPUs are "
                    r"available|Found no NVIDIA driver")


# glibc returns every freed block above 128 KiB to the kernel and faults it in again on the next step: a third
# of a CPU training step went to page faults (tiny preset: 11.9 s → 8.5 s per 65,536 tokens, sys time 3.3 s →
# 0.5 s). Keeping up to 1 GiB in the process costs nothing on a training node. Numerics are unchanged.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824:" \
                  "glibc.malloc.top_pad=268435456"


def job_env(environ) -> dict:
    """The job's environment: the caller's, with MALLOC_TUNABLES unless GLIBC_TUNABLES is already set."""
    env = dict(environ)
    env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    return env


def die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent process dies; nothing elsewhere (no such call)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def keep_attempt(log: Path) -> Path | None:
    """Hard-link ``log`` to the next free ``<stem>.attempt<N>.log``; None where the file system has no links."""
    n = 1
    while (attempt := log.with_name(f"{log.stem}.attempt{n}{log.suffix}")).exists():
        n += 1
    try:
        os.link(log, attempt)
    except OSError:
        return None
    return attempt


def cause(log_text: str, where: Path) -> str:
    """One line naming why a job failed, from its log."""
    if written := FAILED_WRITE.findall(log_text):  # qkrank.atomic names the file it could not write
        where = Path(written[-1]).parent
    free = shutil.disk_usage(where).free if where.exists() else 0
    if DISK_FULL.search(log_text) or (MAYBE_DISK_FULL.search(log_text) and free < LOW_SPACE_BYTES):
        return f"no space left on device: {where.resolve()} ({free:,} bytes free); free space and rerun"
    gpu = NO_GPU.search(log_text)
    if gpu:
        return (f"a GPU was requested but this machine has none ({gpu.group(0)}); set train.device / probe.device "
                f"to 'auto' or 'cpu', or run on a GPU node")
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkrank.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, type=Path, help="the job's log (appended)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the interpreter's arguments")
    args = parser.parse_args(argv)
    command = [sys.executable, *(args.args[1:] if args.args[:1] == ["--"] else args.args)]
    die_with_parent()
    parent = os.getppid()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "ab") as log:
        start = log.tell()  # this attempt's output begins here
        keep_attempt(args.log)
        if os.getppid() != parent:  # the parent died before the request took effect
            return 1
        env = job_env(os.environ)
        child = forkserver.submit(command[1:], env, (0, log.fileno(), log.fileno()))
        if child is None:  # no server, or not a job it runs: a process of its own
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                     env=env)
        for sig in FORWARDED:
            signal.signal(sig, lambda signum, frame: child.send_signal(signum))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        status = child.wait()
    if status != 0:
        with open(args.log, "rb") as log:
            log.seek(max(start, log.seek(0, os.SEEK_END) - 20000))
            tail = log.read().decode(errors="replace")
    with open(args.log, "a") as log:
        if isinstance(child, forkserver.Job) and child.cpu_s is not None:
            # Snakemake's benchmark measures this launcher, not the forked job: its use is here
            print(f"qkrank: forked by {forkserver.__name__}: {child.cpu_s:.2f} CPU-s, "
                  f"peak RSS {child.max_rss_mb:,.0f} MB", file=log)
        if status != 0:
            line = f"qkrank: {' '.join(command[1:3])} failed (exit {status}): {cause(tail, args.log.parent)}"
            print(line, file=log)
            print(line, file=sys.stderr)
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
