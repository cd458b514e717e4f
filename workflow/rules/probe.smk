def probe_forced(path):
    forced = workflow.dag_settings
    return forced.forceall or "probe" in forced.forcerun or path in forced.forcerun or (
        forced.forcetargets and path in forced.targets)


def snapshot_input(wildcards):
    """What a probe reads: a freed snapshot's temp file (so that it is deleted once probed) and its segment
    record, a kept one's record, or train.json (the final snapshot, and runs from before segments)."""
    settings, tokens = settings_of(wildcards), int(wildcards.tokens)
    run = RUN.format(**dict(wildcards.items()))
    record, manifest = f"{run}/segments/{tokens}.json", f"{run}/train.json"
    if tokens == settings["train"]["total_tokens"] or (
            not os.path.exists(record) and os.path.exists(f"{run}/snapshots/{tokens}.pt")):
        return [manifest]
    if tokens in qconfig.kept_snapshot_tokens(settings):
        return [record]
    temp = f"{run}/snapshots/temp/{tokens}.pt"
    probe_file = f"{run}/probe/{tokens}.h5"
    # A finished cell whose probe must run again but whose snapshot was freed: stop before any job runs (and
    # before Snakemake deletes the probe file it was asked to redo), saying how to retrain the cell, where
    # Snakemake would otherwise retrain it silently, segment by segment. Snakemake drops an input function's
    # error when the file exists (`--forcerun probe`), hence the log line too.
    if (os.path.exists(manifest) and not os.path.exists(temp)
            and (not os.path.exists(probe_file) or probe_forced(probe_file))):
        message = qsnapshots.freed_message(Path(run), tokens, settings)
        if message not in FREED_REPORTED:
            FREED_REPORTED.add(message)
            logger.error(f"cannot re-probe: {message}")
        raise WorkflowError(message)
    return [temp, record]


FREED_REPORTED = set()


rule probe:
    input:
        snapshot=snapshot_input,
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
