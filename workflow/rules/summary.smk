# results/summary.md: the verdict, every table and every figure of the study on one Markdown page, and
# the same page as HTML (without the figures) as the first item of `snakemake --report`. Figure captions
# come from workflow/report/<figure>.rst (also the report's captions), so they are inputs.
report: "../report/workflow.rst"


localrules:
    summary,


rule summary:
    input:
        config=f"{RESULTS}/{layout.CONFIG_JSON}",
        tables=TABLES,
        figures=all_figures(),
        captions=[f"{REPORT_DIR}/{name}.rst" for name in FIGURES],
        code=f"{SRC}/qkrank/summary.py",
    output:
        md=f"{RESULTS}/{layout.SUMMARY_MD}",
        html=report(f"{RESULTS}/{layout.SUMMARY_HTML}", caption="../report/summary.rst",
                    category="0 · Summary and verdict", labels={"page": "verdict and tables"}),
    params:
        results=input_dir("config"),
        captions=input_dir("captions"),
    log:
        f"{RESULTS}/logs/summary.log",
    conda:
        "../../environment.yml"
    shell:
        'exec "$QKRANK_PYTHON" -m qkrank.launch --log {log:q} -- -m qkrank.summary --config {input.config:q} --results {params.results:q}'
        " --captions {params.captions:q} --figures {input.figures:q} --out {output.md:q} --html {output.html:q}"
