# Every probe file and training log → tidy tables, the seeds' tables with intervals, and the verdict.
# The outputs are listed once, in qkrank.layout.AGGREGATE_OUTPUTS; the module's own code is an input, so
# editing it re-aggregates (and redraws what depends on the tables) without retraining anything.
rule aggregate:
    input:
        config=f"{RESULTS}/{layout.CONFIG_JSON}",
        probes=probe_files(),
        metrics=[f"{run_dir(cell)}/metrics.csv" for cell in CELLS if cell.optimizer != "pretrained"],
        code=[f"{SRC}/qkrank/{name}.py" for name in layout.AGGREGATE_CODE],
    output:
        [aggregate_output(path) for path in TABLES],
    params:
        results=input_dir("config"),
    log:
        f"{RESULTS}/logs/aggregate.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate.tsv"
    conda:
        "../../environment.yml"
    shell:
        'exec "$QKRANK_PYTHON" -m qkrank.launch --log {log:q} -- -m qkrank.aggregate --config {input.config:q} --results {params.results:q}'
