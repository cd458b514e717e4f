# One rule per figure; each lists its own plotting module as an input, so editing that module redraws
# only that figure (and the summary that inlines it).
FIGURES = {
    # name: tables it reads
    "pr_trajectory": ["mean_pr"],
    "loss": ["losses"],
}


def all_figures():
    return [f"{RESULTS}/figures/{name}.png" for name in FIGURES]


localrules:
    figure,


rule figure:
    input:
        tables=lambda wildcards: [f"{RESULTS}/tables/{t}.csv" for t in FIGURES[wildcards.figure]],
        code=f"{SRC}/qkrank/figures/{{figure}}.py",
        style=f"{SRC}/qkrank/figures/style.py",
    output:
        png=f"{RESULTS}/figures/{{figure}}.png",
        pdf=f"{RESULTS}/figures/{{figure}}.pdf",
    wildcard_constraints:
        figure="|".join(FIGURES),
    log:
        f"{RESULTS}/logs/figures/{{figure}}.log",
    shell:
        "{PY} -m qkrank.figures.{wildcards.figure} --tables {RESULTS}/tables --out {output.png} > {log} 2>&1"
