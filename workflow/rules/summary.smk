# results/summary.md: the verdict, every table and every figure of the study on one Markdown page, and
# the same page as HTML (without the figures) as the first item of `snakemake --report`. Figure captions
# come from workflow/report/<figure>.rst (also the report's captions), so they are inputs.
REPORT_DIR = f"{workflow.basedir}/workflow/report"


report: "../report/workflow.rst"


localrules:
    summary,


rule summary:
    input:
        config=f"{RESULTS}/config.json",
        tables=TABLES,
        figures=all_figures(),
        captions=[f"{REPORT_DIR}/{name}.rst" for name in FIGURES],
        code=f"{SRC}/qkrank/summary.py",
    output:
        md=f"{RESULTS}/summary.md",
        html=report(f"{RESULTS}/summary.html", caption="../report/summary.rst", category="0 · Summary and verdict",
                    labels={"page": "verdict and tables"}),
    log:
        f"{RESULTS}/logs/summary.log",
    shell:
        "{PY} -m qkrank.summary --config {input.config} --results {RESULTS} --captions {REPORT_DIR}"
        " --figures {input.figures} --out {output.md} --html {output.html} > {log} 2>&1"
