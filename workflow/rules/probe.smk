rule probe:
    input:
        manifest=f"{RUN}/train.json",
        data=data_manifest(),
        settings=f"{RUN}/{layout.RUN_FILES['settings']}",
        runtime=ancient(f"{RUN}/{layout.RUN_FILES['runtime']}"),
    output:
        f"{RUN}/{layout.PROBE_FILE}",
    params:
        data=input_dir("data"),
        run_dir=input_dir("manifest"),
    log:
        f"{RESULTS}/logs/probe/{CELL_LOG}/{{tokens}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe/{CELL_LOG}/{{tokens}}.tsv"
    threads: cell_resource("probe", "cpus")
    resources:
        **{name: cell_resource("probe", key) for name, key in JOB_RESOURCES.items()},
    conda:
        "../../environment.yml"
    shell:
        'exec "$QKRANK_PYTHON" -m qkrank.launch --log {log:q} -- -m qkrank.probe --settings {input.settings:q} --data {params.data:q}'
        " --run-dir {params.run_dir:q} --tokens {wildcards.tokens} --out {output:q}"
