rule train:
    input:
        manifest=data_manifest(),
        settings=f"{RUN}/{layout.RUN_FILES['settings']}",
        runtime=ancient(f"{RUN}/{layout.RUN_FILES['runtime']}"),
    output:
        metrics=f"{RUN}/metrics.csv",
        manifest=f"{RUN}/train.json",
    params:
        launcher=train_launcher,
        data=input_dir("manifest"),
        run_dir=parent_dir("manifest"),
    log:
        f"{RESULTS}/logs/train/{CELL_LOG}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{CELL_LOG}.tsv"
    threads: cell_resource("train", "cpus")
    resources:
        **{name: cell_resource("train", key) for name, key in JOB_RESOURCES.items()},
    conda:
        "../../environment.yml"
    # exec: SLURM's SIGTERM at the time limit reaches the launcher, which passes it to python (which
    # checkpoints and exits 75), instead of a shell that dies and orphans it.
    shell:
        'exec "$QKRANK_PYTHON" -m qkrank.launch --log {log:q} -- {params.launcher} -m qkrank.train --settings {input.settings:q} --data {params.data:q}'
        " --out {params.run_dir:q}"
