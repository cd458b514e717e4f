# A cell's training: segments up to each snapshot point (helpers in common.smk), then `train`, the last one,
# which writes metrics.csv and train.json.
rule segment:
    input:
        manifest=data_manifest(),
        settings=f"{RUN}/{layout.RUN_FILES['settings']}",
        runtime=ancient(f"{RUN}/{layout.RUN_FILES['runtime']}"),
        previous=previous_segment,
        state=previous_state,
    output:
        snapshot=temp(f"{RUN}/snapshots/temp/{{tokens}}.pt"),
        record=f"{RUN}/segments/{{tokens}}.json",
    params:
        launcher=train_launcher,
        data=input_dir("manifest"),
        run_dir=lambda wildcards, output: str(Path(output.record).parent.parent),
    log:
        f"{RESULTS}/logs/train/{CELL_LOG}/{{tokens}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{CELL_LOG}/{{tokens}}.tsv"
    threads: cell_resource("train", "cpus")
    resources:
        **{name: cell_resource("train", key) for name, key in JOB_RESOURCES.items()},
    conda:
        "../../environment.yml"
    shell:
        'exec "$QKRANK_PYTHON" -m qkrank.launch --log {log:q} -- {params.launcher} -m qkrank.train'
        " --settings {input.settings:q} --data {params.data:q} --out {params.run_dir:q} --until {wildcards.tokens}"


rule train:
    input:
        manifest=data_manifest(),
        settings=f"{RUN}/{layout.RUN_FILES['settings']}",
        runtime=ancient(f"{RUN}/{layout.RUN_FILES['runtime']}"),
        previous=last_segment_input,
        state=last_segment_state,
    output:
        metrics=f"{RUN}/metrics.csv",
        manifest=f"{RUN}/train.json",
    params:
        launcher=train_launcher,
        data=input_dir("manifest"),
        run_dir=parent_dir("manifest"),
        until=until_args,
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
        'exec "$QKRANK_PYTHON" -m qkrank.launch --log {log:q} -- {params.launcher} -m qkrank.train'
        " --settings {input.settings:q} --data {params.data:q} --out {params.run_dir:q} {params.until:q}"
