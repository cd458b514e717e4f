# Shared names: the validated study, its cells, paths, and the shell prefix every rule uses.
import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from qkrank import config as qconfig  # noqa: E402
from qkrank import snapshots as qsnapshots  # noqa: E402
from qkrank import verify as qverify  # noqa: E402

try:
    STUDY = qconfig.load(config)
    CELLS = qconfig.cells(STUDY)
    SETTINGS = {cell.id: qconfig.cell_settings(STUDY, cell) for cell in CELLS}
    qverify.preflight(STUDY)
except qconfig.ConfigError as error:
    raise WorkflowError(f"invalid config: {error}") from None

RESULTS = STUDY["results_dir"]
# A corrupt probe file or token shard (killed copy, full disk, bit rot) is deleted here, so this very run
# rebuilds it instead of trusting it; only the main process does this, never a job's own snakemake.
if workflow.is_main_process:
    qverify.clean_corrupt(RESULTS, log=logger.warning)
DATA = f"{RESULTS}/data"
RUN = f"{RESULTS}/runs/{{scale}}/{{mode}}/{{optimizer}}/seed{{seed}}"
CELL_LOG = "{scale}/{mode}/{optimizer}/seed{seed}"
SRC = str(Path(workflow.basedir) / "src")
# Rules run the workflow's own source tree, whatever qkrank is installed elsewhere.
PY = f"PYTHONPATH={SRC} python"

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
    return json.dumps(settings_of(wildcards), sort_keys=True)


# printf to a temporary name and mv: atomic, and (unlike a `run:` block) no second snakemake process.
WRITE_PARAM = "printf '%s\\n' {params.text:q} > {output}.tmp && mv {output}.tmp {output}"


# The settings files are the only place a cell's config reaches its jobs: each is rewritten only when
# its content (a param) changes, so changing one cell's config reruns only that cell's jobs.
localrules:
    cell_settings,
    study_config,


rule cell_settings:
    output:
        f"{RUN}/settings.json",
    params:
        text=settings_json,
    shell:
        WRITE_PARAM


rule study_config:
    output:
        f"{RESULTS}/config.json",
    params:
        text=json.dumps(STUDY, sort_keys=True),
    shell:
        WRITE_PARAM


def run_dir(cell):
    return f"{RESULTS}/runs/{cell.id}"


def probe_files():
    return [f"{run_dir(cell)}/probe/{tokens}.h5" for cell in CELLS
            for tokens in qconfig.checkpoint_tokens(SETTINGS[cell.id])]
