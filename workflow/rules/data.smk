# The corpus is tokenized once per study. `data.num_proc` is the job's threads (tokenizer processes) and is
# left out of the params, so changing it does not re-run the data stage: the bytes do not depend on it.
# For data.source: files, the corpus files are inputs: editing one, or adding one a glob matches, rebuilds.
# A cluster profile changes partition or limits with `set-resources` (workflow/profiles/slurm/config.yaml).
rule data:
    input:
        corpus=corpus_files(),
    output:
        tokenizer=f"{DATA}/tokenizer.json",
        train=f"{DATA}/train.bin",
        val=f"{DATA}/val.bin",
        manifest=f"{DATA}/manifest.json",
    params:
        data=data_json(),
        out=parent_dir("manifest"),
    log:
        f"{RESULTS}/logs/data.log",
    benchmark:
        f"{RESULTS}/benchmarks/data.tsv"
    threads: STUDY["data"]["num_proc"]
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        "../../environment.yml"
    shell:
        'exec "$QKRANK_PYTHON" -m qkrank.launch --log {log:q} -- -m qkrank.data --data-json {params.data:q} --num-proc {threads} --out {params.out:q}'
