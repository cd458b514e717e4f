# The corpus is tokenized once per study. `data.num_proc` is the job's threads (tokenizer processes) and is
# left out of the params, so changing it does not re-run the data stage: the bytes do not depend on it.
# A cluster profile changes partition or limits with `set-resources` (workflow/profiles/slurm/config.yaml).
rule data:
    output:
        tokenizer=f"{DATA}/tokenizer.json",
        train=f"{DATA}/train.bin",
        val=f"{DATA}/val.bin",
        manifest=f"{DATA}/manifest.json",
    params:
        data=json.dumps({k: v for k, v in STUDY["data"].items() if k != "num_proc"}, sort_keys=True),
    log:
        f"{RESULTS}/logs/data.log",
    benchmark:
        f"{RESULTS}/benchmarks/data.tsv"
    threads: STUDY["data"]["num_proc"]
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "{PY} -m qkrank.data --data-json {params.data:q} --num-proc {threads} --out {DATA} > {log} 2>&1"
