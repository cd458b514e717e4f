# One rule per figure kind (registry: qkrank.figures.FIGURES). Each lists its own plotting module, with
# style.py and labels.py, as inputs, so editing one module redraws only that figure and what inlines it
# (summary, report). Per-mode figures have one job per (scale, optimizer, mode). Every PNG is flagged for
# `snakemake --report`: caption workflow/report/<figure>.rst, category by figure type, subcategory by
# figure, labels by scale, optimizer, mode and seeds.
from qkrank.figures import FIGURES, figure_modes  # noqa: E402

FIGURE_CODE = f"{SRC}/qkrank/figures"
GRID = STUDY["grid"]
PER_MODE = "{scale}/{optimizer}/{mode}"


def figure_png(name):
    """The PNG of a figure kind, with wildcards for a per-mode one."""
    if "per_mode" in FIGURES[name]:
        return f"{RESULTS}/figures/{name}/{PER_MODE}.png"
    return f"{RESULTS}/figures/{name}.png"


def all_figures():
    """Every figure PNG of the study, in the order the summary shows them."""
    out = []
    for name, spec in FIGURES.items():
        if "per_mode" in spec:
            trained = [s for s in GRID["scales"] if not qconfig.is_hf_scale(STUDY["scales"][s])]
            out += expand(figure_png(name), scale=trained, optimizer=GRID["optimizers"],
                          mode=figure_modes(name, GRID["modes"]))
            # an hf scale (probe_hf.smk) has one cell, {scale}/{its mode}/pretrained/seed0
            out += [figure_png(name).format(scale=c.scale, optimizer=c.optimizer, mode=c.mode) for c in CELLS
                    if c.optimizer == "pretrained" and c.mode in spec["per_mode"]]
        else:
            out.append(figure_png(name))
    return out


def figure_labels(name):
    """Report labels: a per-mode figure names its scale, optimizer and mode; the others the whole grid."""
    if "per_mode" in FIGURES[name]:
        scale, optimizer, mode = "{scale}", "{optimizer}", "{mode}"
    else:
        scale, optimizer, mode = ", ".join(map(str, GRID["scales"])), ", ".join(GRID["optimizers"]), "all"
    return {"figure": FIGURES[name]["title"], "scale": scale, "optimizer": optimizer, "mode": mode,
            "seeds": ", ".join(map(str, GRID["seeds"]))}


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
            selection="--scale {scale} --optimizer {optimizer} --mode {mode}" if "per_mode" in _spec else "",
        wildcard_constraints:
            **({"mode": "|".join(_spec["per_mode"])} if "per_mode" in _spec else {}),
        log:
            f"{RESULTS}/logs/figures/{_name}" + (f"/{PER_MODE}.log" if "per_mode" in _spec else ".log"),
        shell:
            "{PY} -m qkrank.figures.{params.module} --tables {RESULTS}/tables --out {output.png}"
            " {params.selection} > {log} 2>&1"
