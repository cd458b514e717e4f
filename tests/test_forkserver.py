"""The fork server (qkrank.forkserver) as the workflow's jobs meet it: through ``python -m qkrank.launch``.

Each test starts a real server on a copy of the package (so a test job module can be added to it and
edited while the server runs) and runs jobs through the real launcher: the job sees its own directory,
arguments and environment, exits with its own status, is signalled as a process of its own would be, and a
job the server must not run (another environment, not a qkrank module) runs as a process of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import SRC, env_with_src

from qkrank import forkserver

JOB = '''
import json, os, signal, sys, time
from pathlib import Path

import qkrank

sockets = [link for fd in os.listdir("/proc/self/fd") if (link := os.path.realpath(f"/proc/self/fd/{fd}")) and
           ("socket:" in link or link.endswith(".log") and fd not in ("1", "2"))]
print(json.dumps({"version": 1, "package_version": qkrank.__version__, "leaked": sockets,
                  "cwd": os.getcwd(), "argv": sys.argv[1:], "var": os.environ.get("QKRANK_TEST_VAR"),
                  "torch_already_imported": "torch" in sys.modules, "pid": os.getpid(),
                  "torch_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None}),
      flush=True)
what = sys.argv[1]
if what == "exit":
    sys.exit(int(sys.argv[2]))
if what == "raise":
    raise RuntimeError("boom from the job")
if what == "wait":
    def ended(signum, frame):
        Path(sys.argv[2]).write_text(signal.Signals(signum).name)
        sys.exit(75)
    signal.signal(signal.SIGTERM, ended)
    Path(sys.argv[2] + ".started").write_text("")
    while True:
        time.sleep(0.05)
if what == "sleep":
    Path(sys.argv[2]).write_text("")
    time.sleep(60)
if what == "unflushed":  # output still in the buffer when the job ends, as a new interpreter would flush it
    print(f"unflushed before {sys.argv[2]}")
    if sys.argv[2] == "exit":
        sys.exit(3)
    if sys.argv[2] == "raise":
        raise ValueError("raised after unflushed output")
    Path(sys.argv[3]).write_text("")
    time.sleep(60)
'''


@pytest.fixture
def package(tmp_path) -> tuple[Path, dict]:
    """A copy of src/ with a test job module ``qkrank.test_job``, and an environment that imports it."""
    src = tmp_path / "src"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (src / "qkrank" / "test_job.py").write_text(JOB)
    env = env_with_src()
    env["PYTHONPATH"] = str(src)
    env.pop(forkserver.ENV, None)
    env.pop("PYTHONUNBUFFERED", None)  # so that output a job leaves in its buffers is tested
    return src, env


@pytest.fixture
def server(package, tmp_path):
    src, env = package
    started = forkserver.start(tmp_path / "forkserver.log", env)
    forkserver.wait_ready(started)
    env = {**env, forkserver.ENV: str(started[1])}
    yield started, env
    forkserver.stop(started)


def launch(env: dict, log: Path, *argv: str, cwd: Path | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "qkrank.launch", "--log", str(log), "--", *argv]
    if wait:
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_line(log: Path) -> dict:
    return json.loads(log.read_text().splitlines()[0])


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_forked_job_has_its_directory_arguments_environment_and_exit_status(server, tmp_path):
    (_, _), env = server
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    log = tmp_path / "job.log"
    proc = launch({**env, "QKRANK_TEST_VAR": "seen"}, log, "-m", "qkrank.test_job", "exit", "7", cwd=workdir)
    assert proc.returncode == 7
    job = first_line(log)
    assert job["cwd"] == str(workdir) and job["argv"] == ["exit", "7"] and job["var"] == "seen"
    assert job["torch_already_imported"], "the job started a new interpreter instead of being forked"
    assert "qkrank: forked by qkrank.forkserver:" in log.read_text()
    assert "failed (exit 7)" in proc.stderr  # the launcher's closing line, as for a process of its own

    log2 = tmp_path / "job2.log"
    assert launch(env, log2, "-m", "qkrank.test_job", "exit", "0").returncode == 0
    assert first_line(log2)["var"] is None, "a variable of the previous job leaked into the next"


def test_snakemakes_thread_counts_are_the_forked_jobs(server, tmp_path):
    _, env = server
    for threads in (1, 2):
        log = tmp_path / f"job{threads}.log"
        job_env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}  # as Snakemake sets
        assert launch(job_env, log, "-m", "qkrank.test_job", "exit", "0").returncode == 0
        job = first_line(log)
        assert job["torch_already_imported"] and job["torch_threads"] == threads


def test_a_forked_jobs_exception_is_its_log_and_its_failure(server, tmp_path):
    _, env = server
    log = tmp_path / "job.log"
    proc = launch(env, log, "-m", "qkrank.test_job", "raise")
    assert proc.returncode == 1
    assert "Traceback" in log.read_text() and proc.stderr.strip().endswith("RuntimeError: boom from the job")


def test_code_edited_while_the_server_runs_is_what_the_next_job_runs(server, package, tmp_path):
    src, _ = package
    _, env = server
    log = tmp_path / "job.log"
    launch(env, log, "-m", "qkrank.test_job", "exit", "0")
    assert first_line(log)["version"] == 1 and first_line(log)["package_version"] != "edited"
    module = src / "qkrank" / "test_job.py"
    module.write_text(module.read_text().replace('"version": 1', '"version": 2'))
    init = src / "qkrank" / "__init__.py"  # imported by the server itself
    init.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "edited"', init.read_text()))
    log.unlink()
    launch(env, log, "-m", "qkrank.test_job", "exit", "0")
    assert first_line(log)["version"] == 2 and first_line(log)["package_version"] == "edited"


def test_output_left_in_the_buffers_reaches_the_log_however_the_job_ends(server, tmp_path):
    _, env = server
    for how, status in (("exit", 3), ("raise", 1), ("ctrl-c", 130)):
        log, marker = tmp_path / f"{how}.log", tmp_path / f"{how}.started"
        proc = launch(env, log, "-m", "qkrank.test_job", "unflushed", how, str(marker), wait=False)
        if how == "ctrl-c":
            wait_for(marker)
            os.kill(first_line(log)["pid"], signal.SIGINT)
        proc.communicate(timeout=60)
        assert proc.returncode == status and f"unflushed before {how}" in log.read_text(), (how, log.read_text())


def test_a_job_holds_no_socket_or_log_of_the_server_or_of_other_jobs(server, tmp_path):
    _, env = server
    marker = tmp_path / "signal"
    running = launch(env, tmp_path / "running.log", "-m", "qkrank.test_job", "wait", str(marker), wait=False)
    wait_for(Path(f"{marker}.started"))
    log = tmp_path / "job.log"
    assert launch(env, log, "-m", "qkrank.test_job", "exit", "0").returncode == 0
    job = first_line(log)
    assert job["torch_already_imported"] and job["leaked"] == [], job["leaked"]
    running.send_signal(signal.SIGTERM)
    running.communicate(timeout=60)


def test_a_malformed_request_and_ctrl_c_leave_the_server_serving(server, tmp_path):
    (process, path), env = server
    for body in (b"[1, 2]", b"not json", b'{"argv": "-m"}'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw, open(os.devnull, "rb") as null:
            raw.connect(str(path))
            socket.send_fds(raw, [struct.pack("!I", len(body)) + body], [null.fileno()] * 3)
            assert b"refused" in raw.recv(4096)
    os.kill(process.pid, signal.SIGINT)
    log = tmp_path / "job.log"
    assert launch(env, log, "-m", "qkrank.test_job", "exit", "0").returncode == 0
    assert first_line(log)["torch_already_imported"] and process.poll() is None


def test_jobs_the_server_must_not_run_start_a_process_of_their_own(server, tmp_path):
    (_, _), env = server
    log = tmp_path / "job.log"
    assert launch({**env, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, log,
                  "-m", "qkrank.test_job", "exit", "0").returncode == 0
    assert not first_line(log)["torch_already_imported"] and "forked by" not in log.read_text()
    assert "refused a job: environment differs in GLIBC_TUNABLES" in (tmp_path / "forkserver.log").read_text()
    other = tmp_path / "other.log"
    assert launch(env, other, "-c", "import sys; print('torch' in sys.modules)").returncode == 0
    assert other.read_text().strip() == "False"


def test_off_or_no_server_runs_every_job_as_its_own_process(package, tmp_path):
    _, env = package
    for value in (forkserver.OFF, str(tmp_path / "no-such-socket")):
        log = tmp_path / "job.log"
        assert launch({**env, forkserver.ENV: value}, log, "-m", "qkrank.test_job", "exit", "0").returncode == 0
        assert not first_line(log)["torch_already_imported"]


def test_sigterm_to_the_launcher_reaches_the_forked_job(server, tmp_path):
    _, env = server
    marker = tmp_path / "signal"
    proc = launch(env, tmp_path / "job.log", "-m", "qkrank.test_job", "wait", str(marker), wait=False)
    wait_for(Path(f"{marker}.started"))
    job = psutil.Process(first_line(tmp_path / "job.log")["pid"])
    assert "qkrank.test_job wait" in " ".join(job.cmdline()), "ps should show the job's command, not the server's"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 75 and marker.read_text() == "SIGTERM"


def test_a_killed_launcher_ends_its_job_and_the_server_serves_on(server, tmp_path):
    _, env = server
    marker = tmp_path / "signal"
    proc = launch(env, tmp_path / "job.log", "-m", "qkrank.test_job", "wait", str(marker), wait=False)
    wait_for(Path(f"{marker}.started"))
    proc.kill()
    proc.wait()
    wait_for(marker)
    assert marker.read_text() == "SIGTERM"
    assert launch(env, tmp_path / "next.log", "-m", "qkrank.test_job", "exit", "0").returncode == 0
    assert first_line(tmp_path / "next.log")["torch_already_imported"]


def test_ctrl_c_ends_a_forked_job_as_it_ends_a_process_of_its_own(server, tmp_path):
    _, env = server
    statuses = []
    for n, job_env in enumerate((env, {**env, forkserver.ENV: forkserver.OFF})):
        marker, log = tmp_path / f"started{n}", tmp_path / f"job{n}.log"
        proc = launch(job_env, log, "-m", "qkrank.test_job", "sleep", str(marker), wait=False)
        wait_for(marker)
        os.kill(first_line(log)["pid"], signal.SIGINT)  # the job's share of the terminal's SIGINT
        proc.communicate(timeout=60)
        statuses.append((proc.returncode, "KeyboardInterrupt" in log.read_text()))
    assert statuses[0] == statuses[1] == (130, True)


def test_when_the_server_dies_its_jobs_get_sigterm_and_later_jobs_run_on_their_own(server, tmp_path):
    (process, path), env = server
    marker = tmp_path / "signal"
    proc = launch(env, tmp_path / "job.log", "-m", "qkrank.test_job", "wait", str(marker), wait=False)
    wait_for(Path(f"{marker}.started"))
    process.kill()
    process.wait()
    proc.communicate(timeout=60)
    assert marker.read_text() == "SIGTERM" and proc.returncode == 1
    log = tmp_path / "after.log"
    assert launch(env, log, "-m", "qkrank.test_job", "exit", "0").returncode == 0
    assert not first_line(log)["torch_already_imported"]


def test_stop_removes_the_socket_and_its_directory(package, tmp_path):
    _, env = package
    started = forkserver.start(tmp_path / "forkserver.log", env)
    forkserver.wait_ready(started)
    assert started[1].exists()
    forkserver.stop(started)
    assert not started[1].parent.exists() and started[0].returncode is not None
    assert forkserver.start(tmp_path / "forkserver.log", {**env, forkserver.ENV: forkserver.OFF}) is None


def test_a_server_killed_with_its_workflow_leaves_nothing_once_the_next_one_starts(package, tmp_path):
    _, env = package
    killed = forkserver.start(tmp_path / "forkserver.log", env)
    forkserver.wait_ready(killed)
    killed[0].kill()  # kill -9 of the whole workflow: the server cannot clean up
    killed[0].wait()
    assert killed[1].exists()
    running = forkserver.start(tmp_path / "forkserver.log", env)
    try:
        assert not killed[1].parent.exists()
        assert running[1].exists(), "a live server's socket was taken for a stale one"
        assert forkserver.remove_stale() == [] and running[1].exists()
    finally:
        forkserver.stop(running)
    assert "refused" not in (tmp_path / "forkserver.log").read_text()
