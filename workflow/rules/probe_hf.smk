# Public checkpoint suites (hf scales, docs/suites.md): no training job; one probe job per revision loads the
# checkpoint with transformers and writes the same probe file as `probe`, under runs/<scale>/<mode>/pretrained/seed0.
ruleorder: probe_hf > probe


rule probe_hf:
    input:
        data=f"{DATA}/manifest.json",
        settings=f"{RUN}/settings.json",
    output:
        f"{RUN}/probe/{{tokens}}.h5",
    wildcard_constraints:
        optimizer="pretrained",
        seed="0",
    log:
        f"{RESULTS}/logs/probe/{CELL_LOG}/{{tokens}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe/{CELL_LOG}/{{tokens}}.tsv"
    threads: cell_resource("probe", "cpus")
    resources:
        **{name: cell_resource("probe", key) for name, key in JOB_RESOURCES.items()},
    shell:
        "{PY} -m qkrank.probe_hf --settings {input.settings} --data {DATA} --tokens {wildcards.tokens}"
        " --out {output} > {log} 2>&1"
