TABLE_NAMES = ["probes", "losses", "gamma", "mean_pr", "summary_seed004_per_seed", "summary_seed004"]
TABLES = [f"{RESULTS}/tables/{name}.csv" for name in TABLE_NAMES] + [f"{RESULTS}/tables/summary_seed004.md"]


rule aggregate:
    input:
        config=f"{RESULTS}/config.json",
        probes=probe_files(),
        metrics=[f"{run_dir(cell)}/metrics.csv" for cell in CELLS],
    output:
        TABLES,
    log:
        f"{RESULTS}/logs/aggregate.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate.tsv"
    shell:
        "{PY} -m qkrank.aggregate --config {input.config} --results {RESULTS} > {log} 2>&1"
