# The settings files are the only place a cell's config reaches its jobs. settings.json holds what can change
# the cell's results and is rewritten only when that changes (its text is a param), so changing one cell's
# config reruns only that cell's jobs. runtime.json holds resources and runtime knobs (time limits, threads,
# chunk sizes, how many resume states to keep): rewritten when they change, but an ancient() input, so a
# finished cell is never retrained or re-probed for them.
localrules:
    cell_settings,
    cell_runtime,
    study_config,


# printf to a temporary name and mv: atomic, and (unlike a `run:` block) no second snakemake process.
rule cell_settings:
    output:
        f"{RUN}/{layout.RUN_FILES['settings']}",
    params:
        text=settings_json,
    log:
        f"{RESULTS}/logs/settings/{CELL_LOG}.log",
    conda:
        "../../environment.yml"
    shell:
        "(printf '%s\\n' {params.text:q} > {output:q}.tmp && mv {output:q}.tmp {output:q}) > {log:q} 2>&1"


rule cell_runtime:
    output:
        f"{RUN}/{layout.RUN_FILES['runtime']}",
    params:
        text=runtime_json,
    log:
        f"{RESULTS}/logs/settings/{CELL_LOG}.runtime.log",
    conda:
        "../../environment.yml"
    shell:
        "(printf '%s\\n' {params.text:q} > {output:q}.tmp && mv {output:q}.tmp {output:q}) > {log:q} 2>&1"


rule study_config:
    output:
        f"{RESULTS}/{layout.CONFIG_JSON}",
    params:
        text=study_text(),
    log:
        f"{RESULTS}/logs/study_config.log",
    conda:
        "../../environment.yml"
    shell:
        "(printf '%s\\n' {params.text:q} > {output:q}.tmp && mv {output:q}.tmp {output:q}) > {log:q} 2>&1"
