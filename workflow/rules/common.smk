# Shared names: the validated study, its cells, paths (all relative to the working directory, so a moved or
# re-cloned study with its results reruns nothing), the job environment, and the helper functions of the rules.
import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from qkrank import config as qconfig  # noqa: E402
from qkrank import forkserver as qforkserver  # noqa: E402
from qkrank import identity as qidentity  # noqa: E402
from qkrank import layout  # noqa: E402
from qkrank import snapshots as qsnapshots  # noqa: E402
from qkrank import verify as qverify  # noqa: E402
from qkrank.snakemake_scheduler import coalesce_reevaluations  # noqa: E402

# Snakemake's scheduler otherwise adds a timed pass per second for every finished job (snakemake#3744).
coalesce_reevaluations()

try:
    STUDY = qconfig.load(config)
    CELLS = qconfig.cells(STUDY)
    SETTINGS = {cell.id: qconfig.cell_settings(STUDY, cell) for cell in CELLS}
    qverify.preflight(STUDY)
except qconfig.ConfigError as error:
    raise WorkflowError(f"invalid config: {error}") from None

# Nothing is checked or deleted here: corrupt files are found by the jobs that read them and by
# `qkrank verify --fix`, never by a parse step that a dry run or a second snakemake could race.
RESULTS = STUDY["results_dir"]
DATA = f"{RESULTS}/{layout.DATA_DIR}"
RUN = f"{RESULTS}/{layout.RUNS_DIR}/{layout.CELL_PATTERN}"
CELL_LOG = layout.CELL_PATTERN
# The workflow's own source tree, relative to the working directory: code inputs stay the same paths when
# the project moves.
SRC = os.path.relpath(Path(workflow.basedir) / "src")

# Jobs run with the interpreter that runs Snakemake (whatever PATH says), or with $QKRANK_PYTHON if set, and
# import this source tree. Both travel in the environment, not in the commands, so neither is a rerun trigger.
# Under --sdm conda the rule's conda environment provides `python`.
if "conda" in {str(m).lower().rsplit(".", 1)[-1] for m in workflow.deployment_settings.deployment_method}:
    os.environ["QKRANK_PYTHON"] = "python"
else:
    os.environ.setdefault("QKRANK_PYTHON", sys.executable)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(workflow.basedir) / "src"),
                                                         os.environ.get("PYTHONPATH")]))


envvars:
    "QKRANK_PYTHON",
    "PYTHONPATH",


# A local run starts one fork server (src/qkrank/forkserver.py) that has imported torch, numpy and h5py, and
# the launcher has it fork each job instead of starting a new interpreter that imports them again.
# QKRANK_FORKSERVER=off runs every job as its own process; cluster jobs always are.
FORK_SERVER = []
if os.environ.get(qforkserver.ENV) != qforkserver.OFF:
    os.environ.pop(qforkserver.ENV, None)  # an inherited one (a cluster job, a nested run) is not this run's


onstart:
    if workflow.is_main_process and workflow.local_exec and os.environ["QKRANK_PYTHON"] == sys.executable:
        server = qforkserver.start(Path(RESULTS) / "logs" / "forkserver.log")
        if server is not None:
            FORK_SERVER.append(server)
            os.environ[qforkserver.ENV] = str(server[1])


onsuccess:
    qforkserver.stop(FORK_SERVER.pop() if FORK_SERVER else None)


onerror:
    qforkserver.stop(FORK_SERVER.pop() if FORK_SERVER else None)


# Every job is `"$QKRANK_PYTHON" -m qkrank.launch --log LOG -- -m qkrank.<stage> …` (src/qkrank/launch.py: each
# attempt's log kept, the job dies with its snakemake, one closing line naming the cause of a failure).

wildcard_constraints:
    scale=r"[A-Za-z0-9_.\-]+",
    mode="learned|frozen|none",
    optimizer="muon|adamw|pretrained",  # pretrained: hf scales (probe_hf.smk)
    seed=r"\d+",
    tokens=r"\d+",


def cell_of(wildcards):
    return qconfig.Cell(wildcards.scale, wildcards.mode, wildcards.optimizer, int(wildcards.seed))


def settings_of(wildcards):
    return SETTINGS[cell_of(wildcards).id]


def settings_json(wildcards):
    """What can change the cell's results (the rerun identity): settings.json."""
    return json.dumps(qidentity.split_runtime(settings_of(wildcards))[0], sort_keys=True)


def runtime_json(wildcards):
    """Resources and runtime knobs: runtime.json, read by the jobs but no rerun trigger (an ancient input)."""
    return json.dumps(qidentity.split_runtime(settings_of(wildcards))[1], sort_keys=True)


def run_dir(cell):
    return f"{RESULTS}/{layout.RUNS_DIR}/{cell.id}"


def probe_files():
    return [f"{run_dir(cell)}/{layout.PROBE_FILE.format(tokens=tokens)}" for cell in CELLS
            for tokens in qconfig.checkpoint_tokens(SETTINGS[cell.id])]


def parent_dir(key):
    """A params function: the directory of output (or input) ``key``, for commands that take a directory."""

    def directory(wildcards, output):
        return str(Path(output[key]).parent)

    return directory


def input_dir(key):
    """A params function: the directory of input ``key`` (of its first file, for a list)."""

    def directory(wildcards, input):
        files = input[key]
        return str(Path(files if isinstance(files, str) else files[0]).parent)

    return directory


def figure_selection(name):
    """A params function: the --scale/--optimizer/--mode arguments of a per-mode figure, else none."""

    def selection(wildcards):
        if "per_mode" not in FIGURES[name]:
            return []
        return ["--scale", wildcards.scale, "--optimizer", wildcards.optimizer, "--mode", wildcards.mode]

    return selection


def study_text():
    return json.dumps(qidentity.study_identity(STUDY), sort_keys=True)


def corpus_files():
    """For data.source: files, the corpus files (globs expanded now), so editing or adding one rebuilds the data."""
    data = STUDY["data"]
    if data["source"] != "files":
        return []
    return [str(p) for pattern in data["files"]["paths"] for p in qverify.corpus_matches(Path("."), pattern)
            if p.is_file()]


def data_manifest():
    """The data manifest as an input of training and probes. The data section is part of every cell's
    settings.json, so a data change reruns them through it; the manifest itself only marks the data as ready
    (ancient), so rebuilding identical shards (a damaged manifest repaired by `qkrank verify --fix`) retrains
    nothing. A `files` corpus can change without any config change: there the manifest's age counts."""
    manifest = f"{DATA}/manifest.json"
    return manifest if STUDY["data"]["source"] == "files" else ancient(manifest)


def data_json():
    # num_proc changes how fast the data is built, not its bytes: it is the job's threads, not a param.
    return json.dumps({k: v for k, v in STUDY["data"].items() if k != "num_proc"}, sort_keys=True)


def train_launcher(wildcards):
    nproc = settings_of(wildcards)["train"]["nproc"]
    if nproc == 1:
        return ""
    return f"-m torch.distributed.run --standalone --nproc_per_node={nproc}"


# A cell's `resources.<stage>` become the job's resources; the SLURM executor plugin turns them into sbatch
# options: gpu → --gpus, threads → --cpus-per-task, mem_mb → --mem, runtime → --time (minutes),
# slurm_partition → --partition, slurm_extra → appended as is (workflow/profiles/slurm/config.yaml).
JOB_RESOURCES = {"gpu": "gpus", "mem_mb": "mem_mb", "runtime": "runtime",
                 "slurm_partition": "slurm_partition", "slurm_extra": "slurm_extra"}


def cell_resource(stage, key):
    """A rule-resource function: the cell's ``resources.<stage>.<key>`` ("" for an unset partition/extra)."""

    def value(wildcards):
        setting = settings_of(wildcards)["resources"][stage][key]
        return "" if setting is None else setting

    return value


def aggregate_output(path):
    """An aggregate output, flagged for the report when it is one of REPORT_TABLES' CSVs."""
    name = Path(path).name
    if name.endswith(".csv") and name[: -len(".csv")] in REPORT_TABLES:
        return report(path, caption="../report/tables.rst", category="7 · Tables",
                      labels={"table": name[: -len(".csv")]})
    return path


def figure_png(name):
    """The PNG of a figure kind, with wildcards for a per-mode one."""
    if "per_mode" in FIGURES[name]:
        return f"{RESULTS}/figures/{name}/{PER_MODE}.png"
    return f"{RESULTS}/figures/{name}.png"


def all_figures():
    """Every figure PNG of the study, in the order the summary shows them."""
    out = []
    for name, spec in FIGURES.items():
        if "per_mode" in spec:
            trained = [s for s in GRID["scales"] if not qconfig.is_hf_scale(STUDY["scales"][s])]
            out += expand(figure_png(name), scale=trained, optimizer=GRID["optimizers"],
                          mode=figure_modes(name, GRID["modes"]))
            # an hf scale (probe_hf.smk) has one cell, {scale}/{its mode}/pretrained/seed0
            out += [figure_png(name).format(scale=c.scale, optimizer=c.optimizer, mode=c.mode) for c in CELLS
                    if c.optimizer == "pretrained" and c.mode in spec["per_mode"]]
        else:
            out.append(figure_png(name))
    return out


def figure_labels(name):
    """Report labels: a per-mode figure names its scale, optimizer and mode; the others the whole grid."""
    if "per_mode" in FIGURES[name]:
        scale, optimizer, mode = "{scale}", "{optimizer}", "{mode}"
    else:
        scale, optimizer, mode = ", ".join(map(str, GRID["scales"])), ", ".join(GRID["optimizers"]), "all"
    return {"figure": FIGURES[name]["title"], "scale": scale, "optimizer": optimizer, "mode": mode,
            "seeds": ", ".join(map(str, GRID["seeds"]))}


# Figures (registry: qkrank.figures.FIGURES, which loads no plotting library) and the aggregate outputs
# (qkrank.layout) are known before the rules that make them.
from qkrank.figures import FIGURES, figure_modes  # noqa: E402

TABLES = [f"{RESULTS}/{name}" for name in layout.AGGREGATE_OUTPUTS]
# Small, human-sized tables shown in the report (the tidy long tables stay on disk).
REPORT_TABLES = ["summary_seed004", "marks", "gamma_cv_final", "mean_pr_ci"]
FIGURE_CODE = f"{SRC}/qkrank/figures"
GRID = STUDY["grid"]
PER_MODE = "{scale}/{optimizer}/{mode}"
REPORT_DIR = os.path.relpath(Path(workflow.basedir) / "workflow" / "report")


# A cell trains in segments, one job per snapshot point T (`qkrank.train --until T`), each starting from the
# previous one's snapshot file, which also holds its resume state, so every snapshot is probed while training
# goes on and, as a temp() output, deleted once its probe file is complete and the next segment is done
# (train.keep_snapshots: docs/cluster.md, Disk). segments/{T}.json records each snapshot (sha256) and orders
# the segments; rule `train` is the last segment. With
# keep_snapshots: all nothing is freed, so a cell is one training job that writes every snapshot.
def segmented(settings):
    return settings["train"]["keep_snapshots"] != "all"


def previous_segment(wildcards, tokens=None):
    marks = qconfig.checkpoint_tokens(settings_of(wildcards))
    index = marks.index(int(wildcards.tokens) if tokens is None else tokens)
    run = RUN.format(**dict(wildcards.items()))
    return [f"{run}/segments/{marks[index - 1]}.json"] if index else []


def previous_state(wildcards, tokens=None):
    """The state file the segment starts from (the previous segment's temp snapshot, with its resume state)."""
    return [str(Path(p).parent.parent / qsnapshots.TEMP_DIR / f"{Path(p).stem}.pt")
            for p in previous_segment(wildcards, tokens)]


def last_segment_input(wildcards):
    settings = settings_of(wildcards)
    return previous_segment(wildcards, settings["train"]["total_tokens"]) if segmented(settings) else []


def last_segment_state(wildcards):
    settings = settings_of(wildcards)
    return previous_state(wildcards, settings["train"]["total_tokens"]) if segmented(settings) else []


def until_args(wildcards):
    """The last segment's --until (none for a whole run)."""
    settings = settings_of(wildcards)
    return ["--until", str(settings["train"]["total_tokens"])] if segmented(settings) else []


def probe_forced(path):
    forced = workflow.dag_settings
    return forced.forceall or "probe" in forced.forcerun or path in forced.forcerun or (
        forced.forcetargets and path in forced.targets)


FREED_REPORTED = set()


def snapshot_input(wildcards):
    """What a probe reads: a freed snapshot's temp file (so that it is deleted once probed) and its segment
    record, a kept one's record, or train.json (the final snapshot, and runs from before segments)."""
    settings, tokens = settings_of(wildcards), int(wildcards.tokens)
    run = RUN.format(**dict(wildcards.items()))
    record, manifest = f"{run}/segments/{tokens}.json", f"{run}/train.json"
    if tokens == settings["train"]["total_tokens"] or not segmented(settings) or (
            not os.path.exists(record) and os.path.exists(f"{run}/snapshots/{tokens}.pt")):
        return [manifest]
    if tokens in qconfig.kept_snapshot_tokens(settings):
        return [record]
    temp = f"{run}/snapshots/temp/{tokens}.pt"
    probe_file = f"{run}/probe/{tokens}.h5"
    # A finished cell whose probe must run again but whose snapshot was freed: stop before any job runs (and
    # before Snakemake deletes the probe file it was asked to redo), saying how to retrain the cell, where
    # Snakemake would otherwise retrain it silently, segment by segment. Snakemake drops an input function's
    # error when the file exists (`--forcerun probe`), hence the log line too.
    if (os.path.exists(manifest) and not os.path.exists(temp)
            and (not os.path.exists(probe_file) or probe_forced(probe_file))):
        message = qsnapshots.freed_message(Path(run), tokens, settings)
        if message not in FREED_REPORTED:
            FREED_REPORTED.add(message)
            logger.error(f"cannot re-probe: {message}")
        raise WorkflowError(message)
    return [temp, record]
