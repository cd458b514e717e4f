"""A warm process that forks the workflow's Python jobs, so that a job does not pay for importing torch.

Snakemake starts every job as a new process, and a new Python spends more time importing torch, numpy and
h5py than a probe job spends probing. In a local run the Snakefile's ``onstart`` starts one server
(``python -m qkrank.forkserver --socket PATH``) that imports them once; ``qkrank.launch`` (the client) then
hands it the job (``-m qkrank.<module> ARGS``, working directory, environment, and its stdin and log as file
descriptors) over a Unix socket instead of starting an interpreter. The server forks a child that drops
every ``qkrank`` module (so code edited during a run is read afresh, as by a new process), takes the job's
directory, environment and streams, and runs the module as ``__main__``; it reports the child's process id,
then its exit status and resource use.

The child behaves as a process of its own would: SIGTERM and SIGINT as usual, SIGTERM when its launcher
goes away (the server sees the connection close) or when the server dies (``PR_SET_PDEATHSIG``), the same
exit status. The server refuses (and the launcher starts the job the ordinary way) any job that is not a
``qkrank`` module (torchrun), runs under another interpreter, or whose environment differs from the
server's in a variable read when a library is loaded (``LOAD_TIME_PREFIXES``). Set ``QKRANK_FORKSERVER=off``
to run every job as its own process. The server is single-threaded (a selector loop), so it never forks
while another of its threads holds a lock.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import io
import json
import os
import select
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn

ENV = "QKRANK_FORKSERVER"
PREFIX = "qkrank-fork-"  # the socket's directory under the temporary directory
OFF = "off"
# What every job module imports before it works; the job's own qkrank modules are imported by each child.
PRELOAD = ("numpy", "torch", "torch._dynamo", "torch.nn.parallel", "h5py", "yaml", "setproctitle")
# Variables that a library reads when it is loaded (allocator, OpenMP, BLAS, torch, HDF5, the interpreter):
# a job whose value differs from the server's must start a process of its own.
LOAD_TIME_PREFIXES = ("PYTHON", "LD_", "GLIBC_", "MALLOC_", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_",
                      "TORCH", "HDF5_")
# Snakemake sets these to each job's threads. They are exempt from the check above; a forked job's torch
# takes OMP_NUM_THREADS as a new process's would (numpy's own BLAS keeps the server's thread count).
THREAD_COUNTS = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "VECLIB_MAXIMUM_THREADS")
HEADER = struct.Struct("!I")
# The server's environment before its imports, and what the imports added (torch._dynamo sets
# TORCHINDUCTOR_CACHE_DIR, for one).
STARTED_WITH: dict[str, str] = {}
SET_BY_PRELOAD: dict[str, str] = {}
MAX_REQUEST = 1 << 22
START_TIMEOUT_S = 5.0
# A launcher waits this long for the server to take its job (it may still be importing), then starts it itself.
SUBMIT_TIMEOUT_S = 300.0


class Refused(Exception):
    """The server will not run this job (the reason is the message); the launcher starts it itself."""


def load_time_env(environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(LOAD_TIME_PREFIXES) and k not in THREAD_COUNTS}


def servable(argv: list[str]) -> bool:
    """A job the server can run: ``-m qkrank.<module> ...`` with no interpreter options."""
    return len(argv) >= 2 and argv[0] == "-m" and argv[1].startswith("qkrank.")


# ---------------------------------------------------------------------------------------------------- client

class Job:
    """A job the server has forked, with ``send_signal`` and ``wait`` as on a Popen. The child is held by a
    pidfd, so a signal never reaches another process that reused its pid, and its end is seen even where no
    one reaps it."""

    def __init__(self, sock: socket.socket, pid: int, pidfd: int | None):
        self.sock, self.pid, self.pidfd = sock, pid, pidfd
        self.cpu_s: float | None = None  # the child's user + system CPU seconds, once it has ended
        self.max_rss_mb: float | None = None

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signum)
            else:
                os.kill(self.pid, signum)

    def wait(self) -> int:
        """The child's exit status as subprocess reports it (minus the signal that ended it). If the server
        went away before reporting, wait until the child has ended too and return 1."""
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = self.sock.recv(4096)  # a signal handler interrupting this is retried (PEP 475)
            if not chunk:
                break
            reply += chunk
        self.sock.close()
        if not reply.endswith(b"\n"):
            self._wait_until_ended()
            return 1
        report = json.loads(reply)  # the pidfd stays open: a late signal must not go to a reused fd number
        self.cpu_s, self.max_rss_mb = report["cpu_s"], report["max_rss_mb"]
        return report["status"]

    def _wait_until_ended(self) -> None:
        if self.pidfd is not None:  # readable once the process has ended, reaped or not
            select.select([self.pidfd], [], [])
            return
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def submit(argv: list[str], env: dict[str, str], fds: tuple[int, int, int],
           timeout: float = SUBMIT_TIMEOUT_S) -> Job | None:
    """Hand ``python ARGV`` to the server named by ``env[ENV]``, with ``fds`` as its stdin, stdout and stderr.

    None where there is no server, it cannot be reached, it refuses the job or has not answered within
    ``timeout`` (it then drops the job, whose launcher is gone): start the job yourself."""
    path = env.get(ENV, "")
    if not path or path == OFF or not servable(argv) or not os.path.exists(path):
        return None
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env,
                          "executable": os.path.realpath(sys.executable)}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pidfds: list[int] = []
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        socket.send_fds(sock, [HEADER.pack(len(request)) + request], list(fds))
        reply = b""
        while not reply.endswith(b"\n"):
            chunk, received, _flags, _addr = socket.recv_fds(sock, 4096, 1)
            pidfds += received
            if not chunk:
                raise Refused("the server closed the connection")
            reply += chunk
        answer = json.loads(reply)
        if "pid" not in answer:
            raise Refused(answer.get("refused", "no reason given"))
        sock.settimeout(None)
    except (OSError, ValueError, Refused):
        for fd in pidfds:
            os.close(fd)
        sock.close()
        return None
    return Job(sock, answer["pid"], pidfds[0] if pidfds else None)


# ---------------------------------------------------------------------------------------------------- server

def _die_with_parent() -> None:
    from qkrank.launch import die_with_parent

    die_with_parent()


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """The request and the three descriptors sent with it; on any error the descriptors are closed."""
    conn.settimeout(START_TIMEOUT_S)
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    try:
        if not data:
            raise Refused("")  # a connection that only checks the server is there (remove_stale)
        if len(data) < HEADER.size:
            raise Refused("short request")
        (size,) = HEADER.unpack(data[:HEADER.size])
        if size > MAX_REQUEST:
            raise Refused(f"request of {size} bytes")
        body = data[HEADER.size:]
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise Refused("short request")
            body += chunk
        request = json.loads(body)
        _check(request, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)
    return request, fds


def _check(request, fds: list[int]) -> None:
    if not isinstance(request, dict) or not isinstance(request.get("argv"), list) \
            or not isinstance(request.get("env"), dict) or not isinstance(request.get("cwd"), str):
        raise Refused("malformed request")
    if len(fds) != 3:
        raise Refused(f"{len(fds)} file descriptors (stdin, stdout, stderr expected)")
    if request.get("executable") != os.path.realpath(sys.executable):
        raise Refused(f"another interpreter ({request.get('executable')})")
    if not servable(request["argv"]):
        raise Refused(f"not a qkrank module: {' '.join(map(str, request['argv'][:2]))}")
    mine, theirs = load_time_env(STARTED_WITH), load_time_env(request["env"])
    if mine != theirs:
        names = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise Refused(f"environment differs in {', '.join(names)}")
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise Refused("CUDA was initialised in the server; a forked child could not use it")


def _reopen_std_streams(env: dict[str, str]) -> None:
    """New sys.stdout/stderr on the job's descriptors, buffered as a new interpreter would buffer them."""
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    for fd, name in ((1, "stdout"), (2, "stderr")):
        old = getattr(sys, name)
        binary = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)
        stream = io.TextIOWrapper(binary, encoding=old.encoding, errors=old.errors,
                                  line_buffering=not unbuffered and (name == "stderr" or os.isatty(fd)),
                                  write_through=unbuffered)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    sys.stdin = sys.__stdin__ = open(0, closefd=False)


def _become(request: dict, fds: list[int]) -> None:
    """In the forked child: take the job's streams, title, directory, environment, arguments, threads, and a
    fresh qkrank."""
    import random

    import setproctitle

    for fd, target in zip(fds, (0, 1, 2), strict=True):
        os.dup2(fd, target)
        os.close(fd)
    _reopen_std_streams(request["env"])
    # ps, top and psutil show the job's own command line, not the server's
    setproctitle.setproctitle(shlex.join([sys.executable, *request["argv"]]))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for name, value in SET_BY_PRELOAD.items():  # as the imports would set them in a process of its own
        os.environ.setdefault(name, value)
    tempfile.tempdir = None  # TMPDIR is the job's (Snakemake's tmpdir resource)
    if not sys.flags.safe_path:
        sys.path[0] = os.getcwd()  # as `python -m` sets it
    for name in [m for m in sys.modules if m == "qkrank" or m.startswith("qkrank.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    module, *args = request["argv"][1:]
    sys.argv = [module, *args]
    random.seed()  # a new interpreter seeds from the OS; so does each child
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def _run_child(request: dict, fds: list[int]) -> tuple[int, bool]:
    """In the forked child: become the job and run it as ``python -m`` would, up to its end but not its exit.
    Returns (exit status, ended by Ctrl-C); never raises."""
    import runpy

    try:
        _become(request, fds)
        runpy.run_module(request["argv"][1], run_name="__main__", alter_sys=True)
        return 0, False
    except SystemExit as end:
        code = end.code
        if code is None:
            return 0, False
        if isinstance(code, int):
            return code & 0xFF, False
        print(code, file=sys.stderr)
        return 1, False
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        return 130, True
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1, False


def _finish(status: int, interrupted: bool) -> NoReturn:
    """End the child as an interpreter ends: non-daemon threads joined, atexit handlers, streams flushed
    (status 120 if that fails), and death by SIGINT after a Ctrl-C."""
    import threading

    with contextlib.suppress(Exception):
        threading._shutdown()
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


# Signals a job must not lose between the fork and its own handlers: blocked over the fork, kept pending.
JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Server:
    def __init__(self, path: Path, parent: int):
        self.path = path
        self.parent = parent
        self.sigint = signal.getsignal(signal.SIGINT)  # what a job's SIGINT disposition starts as
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound and listening under another name, then renamed: a socket at ``path`` always accepts.
        unready = path.with_name(path.name + ".binding")
        self.listener.bind(str(unready))
        self.listener.listen(64)
        os.rename(unready, path)
        self.wake_r, self.wake_w = socket.socketpair()
        for s in (self.wake_r, self.wake_w):
            s.setblocking(False)
        self.jobs: dict[int, socket.socket] = {}  # child pid → its launcher's connection
        self.stopping = False

    def serve(self) -> None:
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the wakeup fd
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the jobs themselves
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self.stopping:
                for key, _ in self.selector.select(timeout=1.0):
                    try:
                        if key.data == "accept":
                            self._accept()
                        elif key.data == "wake":
                            self._drain_wakeups()
                        else:
                            self._launcher_event(key.fileobj, key.data)
                    except Exception:  # one bad request or failed fork must not end the other jobs
                        print("forkserver: " + traceback.format_exc(), flush=True)
                self._reap()
                if os.getppid() != self.parent:  # the Snakemake that started us is gone
                    break
        finally:
            self.close()

    def _stop(self, *_) -> None:
        self.stopping = True

    def close(self) -> None:
        for pid in list(self.jobs):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        remove_socket(self.path)
        self.listener.close()

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"refused": reason}).encode() + b"\n")
        conn.close()
        if reason:
            print(f"forkserver: refused a job: {reason}", flush=True)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            request, fds = _read_request(conn)
        except (OSError, ValueError, Refused) as error:
            self._refuse(conn, str(error))
            return
        try:
            if _hung_up(conn):
                raise Refused("its launcher is gone")
            pid, pidfd = self._fork(conn, request, fds)
        except (OSError, Refused) as error:  # a failed fork (EAGAIN, ENOMEM): the launcher starts the job
            self._refuse(conn, str(error))
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.jobs[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)
        with contextlib.suppress(OSError):  # a launcher already gone is seen as its connection's end
            socket.send_fds(conn, [json.dumps({"pid": pid}).encode() + b"\n"], [pidfd] if pidfd is not None else [])
        if pidfd is not None:
            os.close(pidfd)

    def _fork(self, conn: socket.socket, request: dict, fds: list[int]) -> tuple[int, int | None]:
        sys.stdout.flush()
        sys.stderr.flush()
        server_pid = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._become_job(conn, request, fds, server_pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # Linux before 5.3
            pidfd = None
        return pid, pidfd

    def _become_job(self, conn: socket.socket, request: dict, fds: list[int], server_pid: int) -> NoReturn:
        status, interrupted = 1, False
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler if self.sigint is signal.default_int_handler
                          else self.sigint)
            self.selector.close()
            for s in (self.listener, self.wake_r, self.wake_w, conn, *self.jobs.values()):
                s.close()
            _die_with_parent()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)  # what came since the fork arrives now
            if os.getppid() == server_pid:  # else the server died before the request took effect
                status, interrupted = _run_child(request, fds)
        finally:
            _finish(status, interrupted)

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            while self.wake_r.recv(512):
                pass

    def _launcher_event(self, conn: socket.socket, pid: int) -> None:
        try:
            data = conn.recv(512)
        except OSError:
            data = b""
        if not data:  # the launcher went away: the job ends as it would with PR_SET_PDEATHSIG
            self.selector.unregister(conn)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)

    def _reap(self) -> None:
        while self.jobs:
            try:
                pid, wait_status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.jobs.pop(pid, None)
            if conn is None:
                continue
            report = {"status": os.waitstatus_to_exitcode(wait_status),
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                      "max_rss_mb": round(usage.ru_maxrss / 1024, 1)}
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(report).encode() + b"\n")
            conn.close()


def _hung_up(conn: socket.socket) -> bool:
    """The peer has closed its end (a launcher that gave up waiting, or died)."""
    poller = select.poll()
    poller.register(conn, select.POLLRDHUP | select.POLLHUP)
    return bool(poller.poll(0))


def preload() -> None:
    STARTED_WITH.update(os.environ)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    SET_BY_PRELOAD.update({k: v for k, v in os.environ.items() if k not in STARTED_WITH})
    if "setproctitle" in sys.modules:  # it finds the command line's memory at its first call, so call it here
        sys.modules["setproctitle"].setproctitle(sys.modules["setproctitle"].getproctitle())
    gc.freeze()  # children's collections never scan (and copy) what the imports made


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkrank.forkserver", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path, help="the Unix socket to listen on")
    parser.add_argument("--parent", type=int, help="end when this process (the Snakemake) is gone "
                        "(default: the parent process)")
    args = parser.parse_args(argv)
    gc.disable()
    _die_with_parent()
    parent = args.parent or os.getppid()
    if os.getppid() != parent:  # it ended before _die_with_parent took effect
        return 1
    server = Server(args.socket, parent)  # listening before the imports: early launchers wait for them
    started = time.perf_counter()
    preload()
    gc.enable()
    ready_file(args.socket).touch()
    print(f"forkserver: {args.socket}: ready after {time.perf_counter() - started:.2f} s "
          f"({', '.join(m for m in PRELOAD if m in sys.modules)})", flush=True)
    server.serve()
    return 0


# ------------------------------------------------------------------------------------- the workflow's side

def start(log: Path, environ=os.environ) -> tuple[subprocess.Popen, Path] | None:
    """Start a server for this Snakemake run, its output appended to ``log``; None where ``environ`` says
    ``QKRANK_FORKSERVER=off``. The caller puts the returned socket path into the jobs' environment."""
    if environ.get(ENV) == OFF:
        return None
    from qkrank.launch import job_env

    remove_stale()
    try:
        directory = Path(tempfile.mkdtemp(prefix=PREFIX))  # private (0700), short enough for a socket
        path = directory / "socket"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            # No preexec_fn: the caller (Snakemake) has threads; the server asks for PR_SET_PDEATHSIG itself.
            process = subprocess.Popen([sys.executable, "-m", "qkrank.forkserver", "--socket", str(path),
                                        "--parent", str(os.getpid())],
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       env=job_env(environ))
    except OSError as error:  # the jobs then start as processes of their own
        print(f"qkrank: no fork server ({error}): every job starts its own interpreter", file=sys.stderr)
        return None
    # Listening takes ~0.1 s; the imports after it do not hold Snakemake up (the first jobs wait for them).
    deadline = time.monotonic() + 30
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            print(f"qkrank: the fork server did not start (see {log}): every job starts its own interpreter",
                  file=sys.stderr)
            stop((process, path))
            return None
        time.sleep(0.01)
    return process, path


def remove_stale() -> list[Path]:
    """Remove this user's socket directories whose server is gone without removing them (kill -9 of the whole
    workflow): the socket is there and refuses connections. Returns what was removed."""
    removed = []
    for directory in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        path = directory / "socket"
        try:
            if directory.stat().st_uid != os.getuid() or not path.exists():
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(str(path))  # a live server takes this for an empty request and drops it
        except ConnectionRefusedError:
            if remove_socket(path):
                removed.append(directory)
        except OSError:
            continue
    return removed


def ready_file(path: Path) -> Path:
    """Exists once the server listening on ``path`` has imported ``PRELOAD``."""
    return path.with_name(path.name + ".ready")


def wait_ready(server: tuple[subprocess.Popen, Path], timeout: float = 120.0) -> None:
    """Block until ``server`` has done its imports; RuntimeError if it ended or ``timeout`` passed first."""
    process, path = server
    deadline = time.monotonic() + timeout
    while not ready_file(path).exists():
        if process.poll() is not None:
            raise RuntimeError(f"the fork server ended (exit {process.returncode}) before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the fork server was not ready after {timeout:.0f} s")
        time.sleep(0.02)


def stop(server: tuple[subprocess.Popen, Path] | None) -> None:
    """End a server started by ``start`` and remove its socket directory."""
    if server is None:
        return
    process, path = server
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    remove_socket(path)


def remove_socket(path: Path) -> bool:
    """Remove a server's socket, its ready file and the directory start() made for them; True if it is gone."""
    for leftover in (path, ready_file(path)):
        with contextlib.suppress(OSError):
            leftover.unlink()
    try:
        path.parent.rmdir()
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
