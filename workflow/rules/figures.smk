# One rule per figure kind (registry: qkrank.figures.FIGURES). Each lists its own plotting module, with
# style.py and labels.py, as inputs, so editing one module redraws only that figure and what inlines it
# (summary, report). Per-mode figures have one job per (scale, optimizer, mode). Every PNG is flagged for
# `snakemake --report`: caption workflow/report/<figure>.rst, category by figure type, subcategory by
# figure, labels by scale, optimizer, mode and seeds.
for _name, _spec in FIGURES.items():

    rule:
        name:
            f"figure_{_name}"
        localrule: True
        input:
            tables=[f"{RESULTS}/tables/{t}.csv" for t in _spec["tables"]],
            code=f"{FIGURE_CODE}/{_name}.py",
            style=f"{FIGURE_CODE}/style.py",
            labels=f"{FIGURE_CODE}/labels.py",
        output:
            png=report(figure_png(_name), caption=f"../report/{_name}.rst", category=_spec["category"],
                       subcategory=_spec["title"], labels=figure_labels(_name)),
            pdf=figure_png(_name).removesuffix(".png") + ".pdf",
        params:
            module=_name,
            tables=input_dir("tables"),
            selection=figure_selection(_name),
        wildcard_constraints:
            **({"mode": "|".join(_spec["per_mode"])} if "per_mode" in _spec else {}),
        log:
            f"{RESULTS}/logs/figures/{_name}/{PER_MODE}.log" if "per_mode" in _spec else f"{RESULTS}/logs/figures/{_name}.log",
        conda:
            "../../environment.yml"
        shell:
            'exec "$QKRANK_PYTHON" -m qkrank.launch --log {log:q} -- -m qkrank.figures.{params.module} --tables {params.tables:q} --out {output.png:q}'
            " {params.selection:q}"
