rule data:
    output:
        tokenizer=f"{DATA}/tokenizer.json",
        train=f"{DATA}/train.bin",
        val=f"{DATA}/val.bin",
        manifest=f"{DATA}/manifest.json",
    params:
        data=json.dumps(STUDY["data"], sort_keys=True),
    log:
        f"{RESULTS}/logs/data.log",
    benchmark:
        f"{RESULTS}/benchmarks/data.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "{PY} -m qkrank.data --data-json {params.data:q} --out {DATA} > {log} 2>&1"
