def train_launcher(wildcards):
    nproc = settings_of(wildcards)["train"]["nproc"]
    if nproc == 1:
        return "python"
    return f"torchrun --standalone --nproc_per_node={nproc}"


# A cell's `resources.<stage>` become the job's resources; the SLURM executor plugin turns them into sbatch
# options: gpu → --gpus, threads → --cpus-per-task, mem_mb → --mem, runtime → --time (minutes),
# slurm_partition → --partition, slurm_extra → appended as is (workflow/profiles/slurm/config.yaml).
JOB_RESOURCES = {"gpu": "gpus", "mem_mb": "mem_mb", "runtime": "runtime",
                 "slurm_partition": "slurm_partition", "slurm_extra": "slurm_extra"}


def cell_resource(stage, key):
    """A rule-resource function: the cell's ``resources.<stage>.<key>`` ("" for an unset partition/extra)."""

    def value(wildcards):
        setting = settings_of(wildcards)["resources"][stage][key]
        return "" if setting is None else setting

    return value


rule train:
    input:
        manifest=f"{DATA}/manifest.json",
        settings=f"{RUN}/settings.json",
    output:
        metrics=f"{RUN}/metrics.csv",
        manifest=f"{RUN}/train.json",
    params:
        launcher=train_launcher,
        run_dir=RUN,
    log:
        f"{RESULTS}/logs/train/{CELL_LOG}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{CELL_LOG}.tsv"
    threads: cell_resource("train", "cpus")
    resources:
        **{name: cell_resource("train", key) for name, key in JOB_RESOURCES.items()},
    # exec: SLURM's SIGTERM at the time limit must reach python (which checkpoints and exits 75), not a
    # shell that dies and orphans it. >>: a resumed attempt's log follows the killed one's.
    shell:
        "PYTHONPATH={SRC} exec {params.launcher} -m qkrank.train --settings {input.settings} --data {DATA}"
        " --out {params.run_dir} >> {log} 2>&1"
