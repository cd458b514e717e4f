# results/summary.md: the verdict, every table and every figure of the study on one Markdown page.
# Figure captions come from workflow/report/<figure>.rst (also the report's captions), so they are inputs.
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
        f"{RESULTS}/summary.md",
    log:
        f"{RESULTS}/logs/summary.log",
    shell:
        "{PY} -m qkrank.summary --config {input.config} --results {RESULTS} --captions {REPORT_DIR}"
        " --figures {input.figures} --out {output} > {log} 2>&1"
