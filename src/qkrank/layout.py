"""The on-disk contract of a study: where every file lives, what the aggregate writes, schema versions, and
the one check that a probe file can be trusted.

Torch-free and pandas-free on purpose: the workflow imports it to build the DAG (``snakemake -n`` must stay
fast), and verify/probe/aggregate import it so that the layout is spelled out once. Paths are relative to
the results directory unless a function takes ``results``.
"""

from __future__ import annotations

from pathlib import Path

from qkrank.config import Cell

PROBE_SCHEMA_VERSION = 2  # attrs["schema_version"] of every probe file (docs/hdf5.md); 2: pr_seq, pr_n, weight spectra

# results/…
DATA_DIR = "data"
DATA_FILES = ("tokenizer.json", "train.bin", "val.bin", "manifest.json")
RUNS_DIR = "runs"
CELL_PATTERN = "{scale}/{mode}/{optimizer}/seed{seed}"  # a cell id, also its directory under runs/
RUN_FILES = {"settings": "settings.json", "runtime": "runtime.json", "metrics": "metrics.csv",
             "manifest": "train.json"}
PROBE_FILE = "probe/{tokens}.h5"
CONFIG_JSON = "config.json"
SUMMARY_MD, SUMMARY_HTML = "summary.md", "summary.html"

# Every file the aggregate step writes, relative to the results directory (the aggregate rule's outputs).
TABLE_NAMES = ("probes", "losses", "gamma", "spectra", "mean_pr", "mean_pr_ci", "layer_pr", "loss_curves",
               "gamma_cv", "gamma_cv_final", "summary_seed004_per_seed", "summary_seed004", "marks_per_seed",
               "marks", "paradox", "paired", "gamma_pr_points", "gamma_pr_per_seed", "gamma_pr",
               "gamma_dims_per_seed", "gamma_dims", "depth_pr_per_seed", "depth_pr", "weight_spectra")
MARKDOWN_NAMES = ("mean_pr_ci", "gamma_cv_final", "summary_seed004", "marks", "paradox", "verdict", "paired",
                  "analyses", "planner")
AGGREGATE_OUTPUTS = tuple([f"tables/{n}.csv" for n in TABLE_NAMES] + [f"tables/{n}.md" for n in MARKDOWN_NAMES]
                          + ["verdict.json"])
# The aggregate job's source modules (src/qkrank/<name>.py): its code inputs, so editing one re-aggregates.
AGGREGATE_CODE = ("aggregate", "collect", "tables", "compare", "analyses", "markdown", "stats", "verdict",
                  "planner", "layout")


def run_dir(results: str | Path, cell: Cell) -> Path:
    return Path(results) / RUNS_DIR / cell.id


def probe_path(results: str | Path, cell: Cell, tokens: int) -> Path:
    return run_dir(results, cell) / PROBE_FILE.format(tokens=tokens)


def aggregate_outputs(results: str | Path) -> tuple[Path, ...]:
    return tuple(Path(results) / name for name in AGGREGATE_OUTPUTS)


def cell_of_run_dir(path: str | Path) -> tuple[Path, Cell]:
    """``results/runs/{scale}/{mode}/{optimizer}/seed{N}`` → (results, cell); ConfigError if it is not one."""
    parts = Path(path).parts
    if len(parts) < 5 or parts[-5] != RUNS_DIR:
        from qkrank.config import ConfigError

        raise ConfigError(f"{path} is not a cell run directory <results>/{RUNS_DIR}/{CELL_PATTERN}")
    return Path(*parts[:-5]), Cell.parse("/".join(parts[-4:]))


def probe_file_problem(path: str | Path, deep: bool = False) -> str | None:
    """Why a probe HDF5 file cannot be trusted, as a message naming it, or None if it can.

    Missing, unreadable (truncated or corrupt), without the ``complete`` attribute, or of another schema
    version. ``deep`` also reads every dataset, which catches damage to metadata and to compressed data
    (zlib checksums). A file that exists but is locked or busy (another process holds it open for writing)
    is reported as such by :func:`probe_file_busy`, never as corrupt: callers check that first.
    """
    import h5py  # deferred: importing this module must stay light

    path = Path(path)
    if not path.is_file():
        return f"{path}: probe file is missing"
    try:
        with h5py.File(path, "r", locking=False) as f:
            complete = bool(f.attrs.get("complete", False))
            version = f.attrs.get("schema_version")
            if complete and version == PROBE_SCHEMA_VERSION and deep:
                f.visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        return f"{path}: unreadable HDF5, truncated or corrupt ({type(e).__name__}: {e}); delete it and rerun " \
               "the workflow to re-probe"
    return attrs_problem({"complete": complete, "schema_version": version}, path)


def attrs_problem(attrs, path: str | Path) -> str | None:
    """The part of the probe-file check that reads only the root attributes of an open file."""
    if not attrs.get("complete", False):
        return f"{path}: incomplete probe file (no 'complete' attribute); delete it and rerun the workflow"
    version = attrs.get("schema_version")
    if version != PROBE_SCHEMA_VERSION:
        return (f"{path}: probe schema version {version}, this qkrank writes {PROBE_SCHEMA_VERSION}; "
                f"delete it and rerun the workflow to re-probe")
    return None


def probe_file_busy(path: str | Path) -> bool:
    """True if another process holds ``path`` open for writing (an HDF5 lock we cannot take).

    Such a file is in use, not corrupt; it must never be deleted. Where the file system has no locks,
    the answer is False and the content checks decide.
    """
    import h5py

    try:
        with h5py.File(path, "r", locking=True):
            return False
    except OSError as e:
        return "unable to lock file" in str(e).lower()
