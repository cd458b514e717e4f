"""Probe HDF5 files and metrics CSVs → tidy tables, the seeds' tables with intervals, paired comparisons,
the open analyses and the verdict.

``python -m qkrank.aggregate --config results/config.json --results results`` reads every probe file
once (``qkrank.collect``) and writes the files in ``OUTPUTS`` (docs/outputs.md describes each column):
tables (``qkrank.tables``, ``qkrank.compare``, ``qkrank.analyses``), their Markdown (``qkrank.markdown``)
and ``verdict.json`` (``qkrank.verdict``, with the seeds planner of ``qkrank.planner``). This module
imports nothing heavy at the top, so the workflow can read ``OUTPUTS`` cheaply.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qkrank.layout import AGGREGATE_CODE as CODE  # noqa: F401  (the workflow's code inputs)
from qkrank.layout import AGGREGATE_OUTPUTS as OUTPUTS  # noqa: F401  (read by tests and docs)
from qkrank.layout import MARKDOWN_NAMES, TABLE_NAMES  # noqa: F401
from qkrank.settings import AggregateSettings, StudySettings


def build_tables(agg: AggregateSettings, frames: dict) -> dict:
    """Every table of OUTPUTS from the collected frames, plus the scenario results ('scenarios')."""
    from qkrank import analyses, compare
    from qkrank import tables as t

    level, site = agg.ci_level, agg.site
    mpr = t.mean_pr(frames["probes"])
    kpr = t.key_mean_pr(mpr, site)
    per_seed = t.per_seed_summary(kpr, frames["losses"])
    gcv = t.gamma_cv(frames["gamma"])
    marks = t.marks_per_seed(frames["probes"], frames["losses"],
                             t.resolve_marks(agg.marks_tokens, frames["checkpoints"], agg.marks_from), site)
    marks_long = t.marks_table(marks, level)
    found = compare.scenarios(compare.compared_values(per_seed, marks), level, agg.verdict_margin,
                              agg.verdict_alpha)
    points, gpr_seed, gpr = analyses.gamma_pr(gcv, frames["probes"], site, level)
    dims_seed, dims = analyses.gamma_dims(frames["gamma"], frames["dim_energy"], level)
    depth_seed, depth = analyses.depth_pr(frames["probes"], site, level)
    return {
        "probes": frames["probes"], "losses": frames["losses"], "gamma": frames["gamma"],
        "spectra": frames["spectra"], "mean_pr": mpr,
        "mean_pr_ci": t.seed_bands(mpr[mpr.site == site], t.GROUP_COLUMNS + ["tokens_seen", "tensor"], "mean_pr",
                                   level),
        "layer_pr": t.layer_pr(frames["probes"], site, level),
        "loss_curves": t.loss_curves(frames["losses"], level),
        "gamma_cv": gcv,
        "gamma_cv_final": t.seed_bands(t.final_rows(gcv), t.GROUP_COLUMNS + ["layer", "tensor"], "gamma_cv", level),
        "summary_seed004_per_seed": per_seed,
        "summary_seed004": t.summary_table(per_seed, kpr, level),
        "marks_per_seed": marks,
        "marks": marks_long,
        "paradox": marks_long[marks_long.mark_tokens.isin([marks_long.mark_tokens.max()])
                              | marks_long.quantity.isin(["val_loss", "mean_pr"])].reset_index(drop=True),
        "paired": compare.paired_table(found),
        "gamma_pr_points": points, "gamma_pr_per_seed": gpr_seed, "gamma_pr": gpr,
        "gamma_dims_per_seed": dims_seed, "gamma_dims": dims,
        "depth_pr_per_seed": depth_seed, "depth_pr": depth,
        "weight_spectra": analyses.weight_spectra(frames["probes"], level),
        "scenarios": found,
    }


def aggregate(study: StudySettings | dict, results: Path) -> dict:
    """Every file of OUTPUTS under ``results``; ``study`` is the validated config, typed here if it is not yet."""
    from qkrank import compare, markdown, planner
    from qkrank.atomic import atomic_path, atomic_write_text
    from qkrank.collect import collect

    study = StudySettings.from_dict(study)
    agg = study.aggregate
    level = agg.ci_level
    tables = build_tables(agg, collect(study, results))
    found = compare.verdicts(tables["scenarios"])
    hours = planner.hours_per_cell(study)
    for v in found:
        v["planner"] = planner.plan(v, agg.verdict_alpha, agg.planner_power, hours.get(v["scale"]),
                                    len(study.grid.modes))
    out = results / "tables"
    for name in TABLE_NAMES:
        with atomic_path(out / f"{name}.csv") as tmp:
            tables[name].to_csv(tmp, index=False)
    text = {
        "mean_pr_ci": markdown.mean_pr_markdown(tables["mean_pr_ci"], level),
        "gamma_cv_final": markdown.gamma_cv_markdown(tables["gamma_cv_final"], level, study.grid.modes),
        "summary_seed004": markdown.summary_markdown(tables["summary_seed004"], level, tables["paired"]),
        "marks": markdown.marks_markdown(tables["marks"], level),
        "paradox": markdown.paradox_markdown(tables["marks"], level, agg.top_fraction),
        "verdict": markdown.verdict_markdown(found),
        "paired": markdown.paired_markdown(tables["paired"]),
        "analyses": markdown.analyses_markdown(tables["gamma_pr"], tables["gamma_dims"], tables["depth_pr"],
                                               tables["weight_spectra"], level),
        "planner": planner.markdown(found),
    }
    for name in MARKDOWN_NAMES:
        atomic_write_text(out / f"{name}.md", text[name])
    atomic_write_text(results / "verdict.json",
                      json.dumps(compare.json_clean(found), indent=2, ensure_ascii=False) + "\n")
    return tables | {"verdicts": found}


def main(argv=None) -> None:
    from qkrank import config as qconfig
    from qkrank.collect import AggregateError

    parser = argparse.ArgumentParser(description="Aggregate probe files and training logs into tables.")
    qconfig.add_config_args(parser)
    parser.add_argument("--results", type=Path, help="results directory (default: the config's results_dir)")
    args = parser.parse_args(argv)
    try:
        study = StudySettings.from_dict(qconfig.load_from_args(args))
        aggregate(study, args.results or Path(study.results_dir))
    except (qconfig.ConfigError, AggregateError) as e:
        sys.exit(f"qkrank.aggregate: error: {e}")


if __name__ == "__main__":
    main()
