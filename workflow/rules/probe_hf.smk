# Public checkpoint suites (hf scales, docs/suites.md): no training job; one probe job per revision loads the
# checkpoint with transformers and writes the same probe file as `probe`, under runs/<scale>/<mode>/pretrained/seed0.
ruleorder: probe_hf > probe


rule probe_hf:
    input:
        data=data_manifest(),
        settings=f"{RUN}/{layout.RUN_FILES['settings']}",
        runtime=ancient(f"{RUN}/{layout.RUN_FILES['runtime']}"),
    output:
        f"{RUN}/{layout.PROBE_FILE}",
    params:
        data=input_dir("data"),
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
    conda:
        "../../environment.yml"
    shell:
        'exec "$QKRANK_PYTHON" -m qkrank.launch --log {log:q} -- -m qkrank.probe_hf --settings {input.settings:q} --data {params.data:q}'
        " --tokens {wildcards.tokens} --out {output:q}"
