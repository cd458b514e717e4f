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


# A cell trains in segments, one job per snapshot point T (`qkrank.train --until T`), each resuming from the
# previous one's resume state, so every snapshot is probed while training goes on and, as a temp() output,
# deleted once its probe file is complete (train.keep_snapshots: docs/cluster.md, Disk). segments/{T}.json
# records each snapshot (sha256) and orders the segments; rule `train` is the last segment.
def previous_segment(wildcards, tokens=None):
    marks = qconfig.checkpoint_tokens(settings_of(wildcards))
    index = marks.index(int(wildcards.tokens) if tokens is None else tokens)
    run = RUN.format(**dict(wildcards.items()))
    return [f"{run}/segments/{marks[index - 1]}.json"] if index else []


def last_segment_input(wildcards):
    return previous_segment(wildcards, settings_of(wildcards)["train"]["total_tokens"])


def total_tokens(wildcards):
    return settings_of(wildcards)["train"]["total_tokens"]


rule segment:
    input:
        manifest=f"{DATA}/manifest.json",
        settings=f"{RUN}/settings.json",
        previous=previous_segment,
    output:
        snapshot=temp(f"{RUN}/snapshots/temp/{{tokens}}.pt"),
        record=f"{RUN}/segments/{{tokens}}.json",
    params:
        launcher=train_launcher,
        run_dir=RUN,
        log=f"{RESULTS}/logs/train/{CELL_LOG}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{CELL_LOG}/{{tokens}}.tsv"
    threads: cell_resource("train", "cpus")
    resources:
        **{name: cell_resource("train", key) for name, key in JOB_RESOURCES.items()},
    # The cell's one training log (not a declared log: every segment, and the last, `train`, appends to it).
    shell:
        "mkdir -p $(dirname {params.log}) && PYTHONPATH={SRC} exec {params.launcher} -m qkrank.train"
        " --settings {input.settings} --data {DATA} --out {params.run_dir} --until {wildcards.tokens}"
        " >> {params.log} 2>&1"


rule train:
    input:
        manifest=f"{DATA}/manifest.json",
        settings=f"{RUN}/settings.json",
        previous=last_segment_input,
    output:
        metrics=f"{RUN}/metrics.csv",
        manifest=f"{RUN}/train.json",
    params:
        launcher=train_launcher,
        run_dir=RUN,
        total=total_tokens,
        log=f"{RESULTS}/logs/train/{CELL_LOG}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{CELL_LOG}.tsv"
    threads: cell_resource("train", "cpus")
    resources:
        **{name: cell_resource("train", key) for name, key in JOB_RESOURCES.items()},
    # exec: SLURM's SIGTERM at the time limit must reach python (which checkpoints and exits 75), not a
    # shell that dies and orphans it. >>: a resumed attempt's log follows the killed one's, and the last
    # segment's log its predecessors' (not a declared log: Snakemake would empty it before the job).
    shell:
        "mkdir -p $(dirname {params.log}) && PYTHONPATH={SRC} exec {params.launcher} -m qkrank.train"
        " --settings {input.settings} --data {DATA} --out {params.run_dir} --until {params.total}"
        " >> {params.log} 2>&1"
