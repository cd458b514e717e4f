rule probe:
    input:
        manifest=f"{RUN}/train.json",
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
    threads: lambda wildcards: settings_of(wildcards)["resources"]["probe"]["cpus"]
    resources:
        gpus=lambda wildcards: settings_of(wildcards)["resources"]["probe"]["gpus"],
        mem_mb=lambda wildcards: settings_of(wildcards)["resources"]["probe"]["mem_mb"],
        runtime=lambda wildcards: settings_of(wildcards)["resources"]["probe"]["runtime"],
    shell:
        "{PY} -m qkrank.probe --settings {input.settings} --data {DATA} --run-dir {params.run_dir}"
        " --tokens {wildcards.tokens} --out {output} > {log} 2>&1"
