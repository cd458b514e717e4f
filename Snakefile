# qkrank: QK-Norm, γ and the dimensional structure of attention keys.
# Stages (one rule family each, every rule a thin call of `python -m qkrank.<stage>`):
#   data → train[cell] → probe[cell, tokens] → aggregate → figures → summary
# Run: `snakemake --cores all` (config.yaml) or `snakemake --configfile configs/X.yaml ...`. Every plain
# `snakemake` here loads profiles/default (beside this file, where Snakemake looks for it).
from snakemake.utils import min_version, validate

min_version("9.0")


# config.yaml is the default study; a --configfile given on the command line replaces it (a seed config
# is complete on its own, so nothing of the default study leaks into it).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


# common.smk validates first, with qkrank's messages (field path in dotted form, valid values);
# snakemake's own validation against the same schema then fills its defaults into `config`.
include: "workflow/rules/common.smk"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/settings.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/probe_hf.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/summary.smk"


rule all:
    input:
        summary=f"{RESULTS}/{layout.SUMMARY_MD}",
        figures=all_figures(),
        tables=TABLES,
    default_target: True
