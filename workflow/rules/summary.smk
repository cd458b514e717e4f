localrules:
    summary,


rule summary:
    input:
        config=f"{RESULTS}/config.json",
        tables=TABLES,
        figures=all_figures(),
        code=f"{SRC}/qkrank/summary.py",
    output:
        f"{RESULTS}/summary.md",
    log:
        f"{RESULTS}/logs/summary.log",
    shell:
        "{PY} -m qkrank.summary --config {input.config} --results {RESULTS} --out {output} > {log} 2>&1"
