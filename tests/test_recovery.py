"""Recovery and portability as a user meets them: the README's own commands after kill -9 and Ctrl-C, a study
that is moved, jobs with the venv off PATH, a project path with a space, and the knobs that must not rerun.

Each study here is the micro config written as ``config.yaml`` of a copy of the project, so the README's
``snakemake --cores all`` runs it verbatim (the README's commands are read from its markers).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import psutil
import pytest
from conftest import REPO, env_with_src, micro_config, write_config
from conftest import copy_project as conftest_copy_project

from qkrank import checkpoint, launch
from qkrank import verify as qverify

VENV_BIN = str(Path(sys.executable).parent)
CELL = "tiny/learned/muon/seed0"


def readme_command(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->`([^`]+)`", text)
    assert match, f"README.md has no <!-- {marker} --> command"
    return match.group(1)


RUN, UNLOCK = readme_command("run-command"), readme_command("unlock-command")


def copy_project(dest: Path, **overrides) -> Path:
    """The project (Snakefile, profiles, workflow, src) with the micro study as its config.yaml."""
    dest.mkdir(parents=True)
    return conftest_copy_project(dest, study_config(**overrides))


def study_config(**overrides) -> dict:
    """The micro study keeping every snapshot, so a damaged probe file can be re-probed and every snapshot
    compared after a kill."""
    cfg = micro_config(**overrides)
    cfg["scales"]["tiny"]["train"]["keep_snapshots"] = "all"
    return cfg


def user_env(path_has_venv: bool = True) -> dict:
    """A user's shell: no PYTHONPATH; PATH with the venv (activated) or without it (a cron job)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QKRANK_PYTHON", "VIRTUAL_ENV")}
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != VENV_BIN]
    env["PATH"] = os.pathsep.join(([VENV_BIN] if path_has_venv else []) + rest)
    env["OMP_NUM_THREADS"] = "1"
    return env


def shell(cmd: str, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, cwd=cwd, env=env or user_env(), capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def start(cmd: str, cwd: Path) -> subprocess.Popen:
    """The README command in its own process group, as a terminal starts it."""
    return subprocess.Popen(cmd, shell=True, cwd=cwd, env=user_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the workflow finished before the interruption point"
        assert time.time() < end, "timed out waiting for the interruption point"
        time.sleep(0.2)


def probes_done(project: Path) -> int:
    return len(list((project / "results" / "runs").glob("*/*/*/seed*/probe/*.h5")))


def results_of(project: Path) -> dict:
    """What a study computed: every probe file's spectra, every cell's losses and snapshot hashes, the tables'
    numbers (wall-clock columns left out)."""
    results = project / "results"
    out = {}
    for path in sorted(results.glob("runs/*/*/*/seed*/probe/*.h5")):
        with h5py.File(path, "r") as f:
            out[str(path.relative_to(results))] = [f[f"layers/{layer}/k/roped/sv"][()].tolist()
                                                   for layer in range(int(f.attrs["n_layers"]))]
    for path in sorted(results.glob("runs/*/*/*/seed*/train.json")):
        for tokens, entry in json.loads(path.read_text())["snapshots"].items():
            weights = checkpoint.safe_load(path.parent / entry["path"])["model"]
            out[f"{path.parent.relative_to(results)}@{tokens}"] = {
                name: hashlib.sha256(tensor.numpy().tobytes()).hexdigest() for name, tensor in weights.items()}
    for path in sorted(results.glob("runs/*/*/*/seed*/metrics.csv")):
        rows = [line.split(",") for line in path.read_text().splitlines()]
        keep = [i for i, name in enumerate(rows[0]) if "loss" in name or name in ("step", "tokens_seen", "lr")]
        out[str(path.relative_to(results))] = [[row[i] for i in keep] for row in rows]
    out["summary_seed004"] = (results / "tables" / "summary_seed004.csv").read_text()
    return out


def dry_run_jobs(project: Path, env: dict | None = None) -> tuple[dict, str]:
    proc = ok(shell("snakemake -n", project, env))
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}, out
    table = out[out.index("Job stats:"):].splitlines()[3:]
    jobs = {}
    for line in table:
        name, count = line.split()
        if name == "total":
            break
        jobs[name] = int(count)
    return jobs, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted study, run as a cron job would: venv off PATH, snakemake by its full path, from a
    directory whose name has a space."""
    project = copy_project(tmp_path_factory.mktemp("ref") / "my study")
    ok(shell(f"{VENV_BIN}/{RUN}", project, user_env(path_has_venv=False)))
    return project


def test_venv_off_path_and_space_in_path_give_a_complete_study(reference):
    assert " " in str(reference)
    assert (reference / "results" / "summary.md").is_file()
    assert list(reference.parent.iterdir()) == [reference], "no stray file beside the project (unquoted path)"
    jobs, out = dry_run_jobs(reference)
    assert not jobs, out[-2000:]
    assert "Using workflow specific profile profiles/default" in out


def test_a_moved_study_reruns_nothing(reference, tmp_path):
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(reference, moved, symlinks=True)
    jobs, out = dry_run_jobs(moved)
    assert not jobs, out[-3000:]


def test_jobs_as_processes_of_their_own_give_the_same_results_as_forked_jobs(reference, tmp_path):
    """The reference's jobs were forked by its run's fork server (qkrank.forkserver), which is gone with the run;
    with QKRANK_FORKSERVER=off every job is a new interpreter, and every number is the same to the bit."""
    logs = reference / "results" / "logs"
    jobs = [p for p in logs.rglob("*.log") if ".attempt" not in p.name and p.name != "forkserver.log"
            and p.relative_to(logs).parts[0] not in ("settings", "study_config.log")]  # shell rules: no python
    unforked = [str(p.relative_to(logs)) for p in jobs if "qkrank: forked by qkrank.forkserver" not in p.read_text()]
    assert jobs and not unforked, f"jobs not forked by the server: {unforked}"
    socket = re.search(r"forkserver: (\S+): ready", (logs / "forkserver.log").read_text()).group(1)
    assert not Path(socket).parent.exists(), "the fork server's socket directory outlived its run"
    project = copy_project(tmp_path / "unforked")
    ok(shell(RUN, project, {**user_env(), "QKRANK_FORKSERVER": "off"}))
    assert not any("forked by" in p.read_text() for p in (project / "results" / "logs").rglob("*.log"))
    assert results_of(project) == results_of(reference)


def test_kill_9_of_the_whole_workflow_then_the_readme_recovery_gives_the_same_results(reference, tmp_path):
    project = copy_project(tmp_path / "killed")
    proc = start(RUN, project)
    wait_for(lambda: probes_done(project) >= 4, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (project / ".snakemake" / "locks").exists() and any((project / ".snakemake" / "locks").iterdir())
    ok(shell(UNLOCK, project))
    ok(shell(RUN, project))
    assert results_of(project) == results_of(reference)


def test_kill_9_in_the_middle_of_segmented_training_then_the_readme_recovery_gives_the_same_results(tmp_path):
    """The default `keep_snapshots: final`: each cell trains in segments handing on one state file each. A kill -9
    of the whole workflow while segments run, then the README's two commands: the same weights, probes and
    tables as an uninterrupted run, and every freed snapshot gone."""
    reference = conftest_copy_project(tmp_path / "reference", micro_config())
    ok(shell(RUN, reference))
    project = conftest_copy_project(tmp_path / "killed", micro_config())
    proc = start(RUN, project)
    runs = project / "results" / "runs"
    # killed once some cell has handed on a segment state and is training the next segment from it
    wait_for(lambda: runs.exists() and len(list(runs.glob("*/*/*/seed*/segments/*.json"))) >= 3
             and not list(runs.glob("*/*/*/seed*/train.json")), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ok(shell(UNLOCK, project))
    ok(shell(RUN, project))
    assert results_of(project) == results_of(reference)
    assert not list(runs.glob("*/*/*/seed*/snapshots/temp/*.pt")) and not list(runs.glob("*/*/*/seed*/resume/*"))


def test_ctrl_c_then_the_readme_command_gives_the_same_results(reference, tmp_path):
    project = copy_project(tmp_path / "interrupted")
    proc = start(RUN, project)
    wait_for(lambda: any((project / "results" / "runs").glob("*/*/*/seed*/snapshots/*.pt"))
             if (project / "results" / "runs").exists() else False, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    proc.wait(timeout=300)
    ok(shell(RUN, project))
    assert results_of(project) == results_of(reference)


def _job_pids(project: Path) -> list[int]:
    """Processes whose working directory is ``project`` (the jobs), other than snakemake itself."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "cwd") == str(project):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if "qkrank" in cmd and "snakemake" not in cmd:
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux)")
def test_kill_9_of_snakemake_alone_leaves_no_training_running(tmp_path):
    project = copy_project(tmp_path / "orphans")
    proc = start(RUN, project)
    wait_for(lambda: any("qkrank.train" in " ".join(p.cmdline()) for p in _jobs(proc)), proc)
    snakemake = next(p for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                     if "snakemake" in " ".join(p.cmdline()) and "qkrank" not in " ".join(p.cmdline())
                     and Path(p.exe()).name not in ("sh", "bash", "dash"))
    jobs = _jobs(proc)
    snakemake.kill()
    gone, left = psutil.wait_procs(jobs, timeout=60)
    for p in left:
        p.kill()
    os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"jobs kept running after their snakemake was killed: {[p.cmdline() for p in left]}"


def _jobs(proc: subprocess.Popen) -> list[psutil.Process]:
    """The workflow's job processes (launchers and stages), snakemake and its shell left out."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in family:
        try:
            if "qkrank" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def test_runtime_knobs_retrain_nothing(reference, tmp_path):
    project = tmp_path / "knobs"
    shutil.copytree(reference, project, symlinks=True)
    cfg = study_config()
    tiny = cfg["scales"]["tiny"]
    tiny["resources"] = {"train": {"runtime": 120, "cpus": 2, "mem_mb": 9000, "slurm_partition": "gpu"},
                         "probe": {"runtime": 30}}
    tiny["probe"]["chunk_sequences"] = 2
    tiny["train"]["keep_resume_checkpoints"] = 3
    tiny["train"]["threads"] = 1
    write_config(project / "config.yaml", cfg)
    jobs, out = dry_run_jobs(project)
    assert set(jobs) <= {"cell_runtime", "all"}, out[-3000:]
    ok(shell(RUN, project))
    runtime = json.loads((project / "results" / "runs" / CELL / "runtime.json").read_text())
    assert runtime["resources"]["train"]["runtime"] == 120 and runtime["probe"]["chunk_sequences"] == 2
    assert dry_run_jobs(project)[0] == {}
    # A setting that changes results still retrains.
    tiny["optim"] = {"muon": {"lr": 0.01}}
    write_config(project / "config.yaml", cfg)
    assert dry_run_jobs(project)[0].get("train") == 3


def test_a_dry_run_deletes_nothing_and_verify_fix_spares_a_busy_file(reference, tmp_path):
    project = tmp_path / "damaged"
    shutil.copytree(reference, project, symlinks=True)
    results = project / "results"
    bad = results / "runs" / CELL / "probe" / "1024.h5"
    bad.write_bytes(bad.read_bytes()[:500])
    manifest = results / "data" / "manifest.json"
    manifest.write_text("{not json")
    tables = sorted(p.name for p in (results / "tables").iterdir())
    dry_run_jobs(project)
    assert bad.exists() and manifest.exists() and sorted(p.name for p in (results / "tables").iterdir()) == tables
    # A probe file another process holds open is busy, not corrupt: verify --fix leaves it alone.
    busy = results / "runs" / CELL / "probe" / "2048.h5"
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py,time; f=h5py.File({str(busy)!r}, 'a'); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        problems = qverify.check_results(results)
        assert {p.path for p in problems} >= {bad, manifest} and busy not in {p.path for p in problems}
        deleted = qverify.fix(problems, results)
        assert bad in deleted and results / "data" in deleted and busy.exists()
    finally:
        holder.kill()
    trained = {p: p.stat().st_mtime for p in results.glob("runs/*/*/*/seed*/train.json")}
    ok(shell(RUN, project))
    assert results_of(project) == results_of(reference)
    assert {p: p.stat().st_mtime for p in trained} == trained, "a rebuilt identical data manifest retrained cells"


def test_corpus_files_are_inputs_of_the_data_rule(tmp_path):
    project = copy_project(tmp_path / "corpus", data={"source": "files", "tokenizer": {"kind": "bpe",
                                                                                        "vocab_size": 512},
                                                      "files": {"paths": ["corpus/*.txt"], "format": "text"}})
    (project / "corpus").mkdir()
    text = "\n".join(f"line {i} says {i * 7 % 13} words about {i % 5} things" for i in range(300))
    for n in range(20):  # one document per file: enough for a val split
        (project / "corpus" / f"{n:02d}.txt").write_text(f"document {n}\n{text}")
    target = "results/data/manifest.json"

    def plan() -> str:
        proc = ok(shell(f"snakemake -n {target}", project))
        return proc.stdout + proc.stderr

    ok(shell(f"snakemake --cores 1 {target}", project))
    assert "Nothing to be done" in plan()
    with open(project / "corpus" / "07.txt", "a") as f:  # edited
        f.write("one more line\n")
    # The data made before is older than the edit (not the edit in the future: Snakemake calls that clock skew).
    earlier = time.time() - 100
    for made in (project / "results" / "data").iterdir():
        os.utime(made, (earlier, earlier))
    out = plan()
    assert "rule data:" in out and "corpus/07.txt" in out, out[-2000:]
    ok(shell(f"snakemake --cores 1 {target}", project))
    assert "Nothing to be done" in plan()
    (project / "corpus" / "new.txt").write_text(text[::-1])  # a new file matching the glob
    earlier = time.time() - 1000
    os.utime(project / "corpus" / "new.txt", (earlier, earlier))
    out = plan()
    assert "rule data:" in out and "set of input files has changed" in out, out[-2000:]


def test_an_injected_results_dir_is_refused_before_any_job(tmp_path):
    project = copy_project(tmp_path / "inject", results_dir="res;touch PWNED;echo")
    proc = shell(RUN, project)
    assert proc.returncode != 0
    assert "config field 'results_dir'" in proc.stderr and "';'" in proc.stderr
    assert not (project / "PWNED").exists() and not list(project.glob("res*"))


def test_launcher_keeps_every_attempts_log_and_names_the_cause(tmp_path, capsys):
    log = tmp_path / "logs" / "job.log"
    status = launch.main(["--log", str(log), "--", "-c", "print('first attempt'); raise SystemExit(3)"])
    assert status == 3
    log.unlink()  # what Snakemake does before a retry
    status = launch.main(["--log", str(log), "--", "-c",
                          "import errno, os; raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), 'x.pt')"])
    assert status == 1
    assert "first attempt" in (tmp_path / "logs" / "job.attempt1.log").read_text()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("; free space and rerun") and "no space left on device: " in err[-1], err
    assert log.read_text().strip().splitlines()[-1] == err[-1]
    status = launch.main(["--log", str(log), "--", "-c", "raise RuntimeError(\"config field 'train.device': 'cuda' "
                          "requested but CUDA is not available; use 'auto' or 'cpu'\")"])
    assert "a GPU was requested but this machine has none" in capsys.readouterr().err


def test_launcher_runs_the_interpreter_that_runs_it(tmp_path):
    log = tmp_path / "job.log"
    assert launch.main(["--log", str(log), "--", "-c", "import sys; print(sys.executable)"]) == 0
    assert log.read_text().strip() == sys.executable


def test_layout_is_the_one_contract_and_stays_light(tmp_path):
    from qkrank import aggregate, layout

    assert tuple(aggregate.OUTPUTS) == layout.AGGREGATE_OUTPUTS, "aggregate writes what the workflow expects"
    results, cell = layout.cell_of_run_dir(tmp_path / "res" / "runs" / "tiny" / "none" / "adamw" / "seed3")
    assert results == tmp_path / "res" and cell.id == "tiny/none/adamw/seed3"
    assert layout.probe_path("res", cell, 512) == Path("res/runs/tiny/none/adamw/seed3/probe/512.h5")
    code = "import sys, qkrank.layout, qkrank.config; print(sorted({'torch', 'pandas', 'h5py'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=user_env() | {"PYTHONPATH": str(REPO / "src")})
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def _mount_namespace() -> list[str] | None:
    """``unshare`` arguments giving a private mount namespace where a tmpfs can be mounted (root: -m; a user:
    -rm, where user namespaces are allowed), or None."""
    if not shutil.which("unshare"):
        return None
    for flags in (["-m"], ["-rm"]):
        probe = subprocess.run(["unshare", *flags, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                               capture_output=True)
        if probe.returncode == 0:
            return ["unshare", *flags]
    return None


def test_a_really_full_disk_stops_training_with_one_line_naming_it(tmp_path, micro_data):
    """A real full file system (a small tmpfs in a private mount namespace), not a simulated error: the launcher's
    last line names the disk, and nothing half-written is left under a real name."""
    namespace = _mount_namespace()
    if namespace is None:
        pytest.skip("no mount namespace here (unshare -m / -rm refused): cannot make a small file system")
    from qkrank import config as qconfig

    cfg = micro_config()
    cfg["scales"]["tiny"]["train"]["keep_snapshots"] = "all"  # one whole run: snapshot, then resume state
    study = qconfig.load(cfg)
    settings = qconfig.cell_settings(study, qconfig.cells(study)[0])
    settings_path = tmp_path / "settings.json"
    settings_path.write_text(json.dumps(settings))
    from qkrank.model import GPT, ModelConfig

    weights = 4 * GPT(ModelConfig.from_preset("tiny", **{k: v for k, v in settings["model"].items()
                                                        if k != "preset"})).num_params()
    # Room for the first snapshot (weights) but not for the first resume state (weights and two moments).
    size_kb = int(1.6 * weights) // 1024
    disk, log = tmp_path / "disk", tmp_path / "logs" / "train.log"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {disk} || exit 99\n"
              f"{sys.executable} -m qkrank.launch --log {log} -- -m qkrank.train --settings {settings_path} "
              f"--data {micro_data} --out {disk}/run\n"
              "rc=$?\n"
              f"find {disk} -name '*.tmp' | sed 's/^/LEFT: /'\n"
              f"{sys.executable} -c 'import sys, torch; [torch.load(p, weights_only=True) for p in sys.argv[1:]]' "
              f"$(find {disk} -name '*.pt') && echo LOADABLE\n"
              "exit $rc\n")
    proc = subprocess.run([*namespace, "sh", "-c", script], capture_output=True, text=True, env=env_with_src(),
                          timeout=300)
    assert proc.returncode not in (0, 99), proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"qkrank: -m qkrank\.train failed \(exit 1\): no space left on device: "
                        rf"{re.escape(str(disk))}/run\S* "
                        r"\([\d,]+ bytes free\); free space and rerun", last), proc.stderr[-3000:]
    assert "LEFT:" not in proc.stdout and "LOADABLE" in proc.stdout, proc.stdout
    assert f"No space left on device while writing '{disk}/run/" in log.read_text()


def test_launcher_keeps_freed_memory_in_the_job_unless_told_otherwise(tmp_path, monkeypatch):
    log = tmp_path / "job.log"
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert launch.main(["--log", str(log), "--", "-c", "import os; print(os.environ['GLIBC_TUNABLES'])"]) == 0
    assert log.read_text().strip() == launch.MALLOC_TUNABLES
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # a site's own setting wins
    log.unlink()
    assert launch.main(["--log", str(log), "--", "-c", "import os; print(os.environ['GLIBC_TUNABLES'])"]) == 0
    assert log.read_text().strip() == "glibc.malloc.arena_max=2"
