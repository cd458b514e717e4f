# Every probe file and training log → tidy tables, the seeds' tables with intervals, and the verdict.
# The outputs are listed once, in qkrank.aggregate.OUTPUTS; the module's own code is an input, so
# editing it re-aggregates (and redraws what depends on the tables) without retraining anything.
from qkrank.aggregate import CODE as AGGREGATE_CODE  # noqa: E402
from qkrank.aggregate import OUTPUTS as AGGREGATE_OUTPUTS  # noqa: E402

TABLES = [f"{RESULTS}/{name}" for name in AGGREGATE_OUTPUTS]
# Small, human-sized tables shown in the report (the tidy long tables stay on disk).
REPORT_TABLES = ["summary_seed004", "marks", "gamma_cv_final", "mean_pr_ci"]


def aggregate_output(path):
    """An aggregate output, flagged for the report when it is one of REPORT_TABLES' CSVs."""
    name = Path(path).name
    if name.endswith(".csv") and name[: -len(".csv")] in REPORT_TABLES:
        return report(path, caption="../report/tables.rst", category="7 · Tables",
                      labels={"table": name[: -len(".csv")]})
    return path


rule aggregate:
    input:
        config=f"{RESULTS}/config.json",
        probes=probe_files(),
        metrics=[f"{run_dir(cell)}/metrics.csv" for cell in CELLS if cell.optimizer != "pretrained"],
        code=[f"{SRC}/qkrank/{name}.py" for name in AGGREGATE_CODE],
    output:
        [aggregate_output(path) for path in TABLES],
    log:
        f"{RESULTS}/logs/aggregate.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate.tsv"
    shell:
        "{PY} -m qkrank.aggregate --config {input.config} --results {RESULTS} > {log} 2>&1"
