rule probe:
    input:
        manifest=f"{RUN}/train.json",
        data=f"{DATA}/manifest.json",
        settings=f"{RUN}/settings.json",
    output:
        f"{RUN}/probe/{{tokens}}.h5",
    params:
        run_dir=RUN,
    log:
        f"{RESULTS}/logs/probe/{CELL_LOG}/{{tokens}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe/{CELL_LOG}/{{tokens}}.tsv"
    threads: cell_resource("probe", "cpus")
    resources:
        **{name: cell_resource("probe", key) for name, key in JOB_RESOURCES.items()},
    shell:
        "{PY} -m qkrank.probe --settings {input.settings} --data {DATA} --run-dir {params.run_dir}"
        " --tokens {wildcards.tokens} --out {output} > {log} 2>&1"
