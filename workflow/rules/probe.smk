# One probe job per snapshot; its input (common.smk: snapshot_input) is the snapshot's temp file when it is
# freed after probing, so Snakemake deletes it once the probe file is complete.
rule probe:
    input:
        snapshot=snapshot_input,
        data=data_manifest(),
        settings=f"{RUN}/{layout.RUN_FILES['settings']}",
        runtime=ancient(f"{RUN}/{layout.RUN_FILES['runtime']}"),
    output:
        f"{RUN}/{layout.PROBE_FILE}",
    wildcard_constraints:
        optimizer="muon|adamw",
    params:
        data=input_dir("data"),
        run_dir=input_dir("settings"),
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
