def train_launcher(wildcards):
    nproc = settings_of(wildcards)["train"]["nproc"]
    if nproc == 1:
        return f"{PY}"
    return f"PYTHONPATH={SRC} torchrun --standalone --nproc_per_node={nproc}"


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
    threads: lambda wildcards: settings_of(wildcards)["resources"]["train"]["cpus"]
    resources:
        gpus=lambda wildcards: settings_of(wildcards)["resources"]["train"]["gpus"],
        mem_mb=lambda wildcards: settings_of(wildcards)["resources"]["train"]["mem_mb"],
        runtime=lambda wildcards: settings_of(wildcards)["resources"]["train"]["runtime"],
        slurm_partition=lambda wildcards: settings_of(wildcards)["resources"]["train"]["slurm_partition"] or "",
        slurm_extra=lambda wildcards: settings_of(wildcards)["resources"]["train"]["slurm_extra"] or "",
    shell:
        "{params.launcher} -m qkrank.train --settings {input.settings} --data {DATA}"
        " --out {params.run_dir} > {log} 2>&1"
