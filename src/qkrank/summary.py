"""``results/summary.md``: the verdict, every table and every figure of the study on one Markdown page.

``python -m qkrank.summary --config results/config.json --results results --captions workflow/report
--figures results/figures/*.png ... --out results/summary.md [--html results/summary.html]``. Figure
captions are the report's (``workflow/report/<figure>.rst``), so the summary and the HTML report say the
same thing; the HTML page (text and tables, figures left to the report) is the report's first item.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import sys
from pathlib import Path

from qkrank import config as qconfig
from qkrank import suites
from qkrank.atomic import atomic_write_text
from qkrank.figures import FIGURES
from qkrank.figures.labels import MODE_LABELS, format_tokens
from qkrank.settings import StudySettings

# Table sections in reading order: (heading, file under tables/, what the seed calls it).
TABLE_SECTIONS = (
    ("Seed 004 §3.1 summary", "summary_seed004.md", "Initial, minimum and final mean key PR; final losses."),
    ("Seed 000 token marks", "marks.md", "Validation loss and mean key PR at the configured token marks."),
    ("Seed 000 “paradox” table", "paradox.md", "Loss beside structure: PR, layer uniformity, spectral "
                                                "concentration."),
    ("γ coefficient of variation per layer (seed 004 §5)", "gamma_cv_final.md", "Final checkpoint."),
    ("Mean query and key PR over training", "mean_pr_ci.md", "Every checkpoint."),
    ("Paired differences between modes", "paired.md", "Every compared quantity: per-seed differences a − b, "
                                                      "their mean and interval, and the pair decision."),
    ("The seeds' open analyses", "analyses.md", "γ–PR relation, individual γ, depth–PR gradient, weight spectra."),
    ("Seeds planner", "planner.md", "Seeds (and H100-hours, 6·N·D at 40% MFU) that would resolve each pair "
                                    "(docs/verdict.md, “Reading the planner”)."),
)


class SummaryError(RuntimeError):
    pass


def caption_text(rst: Path) -> str:
    """A report caption (.rst) as one Markdown paragraph: inline ``code`` becomes `code`, lines are joined."""
    if not rst.exists():
        raise SummaryError(f"{rst}: caption file missing; every figure needs workflow/report/<figure>.rst")
    text = " ".join(line.strip() for line in rst.read_text().splitlines() if line.strip())
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def figure_kind(png: Path, figures_dir: Path) -> tuple[str, str]:
    """(figure kind, which one) from a path: figures/<kind>.png or figures/<kind>/<scale>/<optimizer>/<mode>.png."""
    parts = png.relative_to(figures_dir).with_suffix("").parts
    if len(parts) == 1:
        return parts[0], ""
    if len(parts) == 4:
        scale, optimizer, mode = parts[1:]
        return parts[0], f"{scale} · {optimizer} · {MODE_LABELS.get(mode, mode)}"
    raise SummaryError(f"{png}: not a figure path of the form figures/<kind>.png or "
                       "figures/<kind>/<scale>/<optimizer>/<mode>.png")


def verdict_headline(verdicts: list[dict]) -> list[str]:
    """One bullet per (scale, optimizer): the scenario for final mean key PR with its paired differences, the
    floor's scenario for context, and the seeds planner next to an undetermined verdict."""
    from qkrank.compare import effect
    from qkrank.planner import planner_lines

    lines = []
    for v in verdicts:
        if v["quantity"] != "final_mean_pr":
            continue
        floor = next((w for w in verdicts if w["quantity"] == "minimum_mean_pr" and w["scale"] == v["scale"]
                      and w["optimizer"] == v["optimizer"]), None)
        extra = f" At the collapse floor the same rule gives: {floor['scenario']}." if floor else ""
        effects = "; ".join(f"{p['a']} − {p['b']}: {effect(_floats(p))} ({p['relation']})" for p in v["pairs"])
        effects = f" Paired differences [{v['ci_level']:.0%}]: {effects}." if effects else ""
        lines.append(f"- **{v['scale']}, {v['optimizer']}: {v['statement']}** {v['reason']}; point estimates "
                     f"{v['ordering']}.{effects}{extra}")
        if v["scenario"] == "undetermined":
            lines += [f"  - Seeds planner: {line}." for line in planner_lines(v)]
    return lines


def _floats(pair: dict) -> dict:
    """A pair from verdict.json with its nulls (NaN in the tables) back as NaN."""
    return {k: (float("nan") if v is None else v) for k, v in pair.items()}


def figure_section(figures: list[Path], results: Path, captions: Path, out: Path) -> list[str]:
    """Figures grouped by kind, each kind with its caption once, in the order given."""
    figures_dir = results / "figures"
    by_kind: dict[str, list[tuple[str, Path]]] = {}
    for png in figures:
        kind, which = figure_kind(Path(png), figures_dir)
        by_kind.setdefault(kind, []).append((which, Path(png)))
    lines = []
    for number, (kind, items) in enumerate(by_kind.items(), start=1):
        caption = caption_text(captions / f"{kind}.rst")
        title = FIGURES[kind]["title"] if kind in FIGURES else kind
        lines += [f"### Figure {number}: {title}", "", caption, ""]
        for which, png in items:
            rel = os.path.relpath(png, out.parent)
            lines += ([f"*{which}*", ""] if which else []) + [f"![{kind} {which}".rstrip() + f"]({rel})", ""]
    return lines


def render(study: StudySettings, results: Path, figures: list[Path], captions: Path, out: Path) -> str:
    grid, agg = study.grid, study.aggregate
    config = study.to_dict()  # for qkrank.config's cells and the suites' note
    tables = results / "tables"
    verdicts = json.loads((results / "verdict.json").read_text())
    marks = ", ".join(format_tokens(m) for m in agg.marks_tokens) or "the final checkpoint"
    lines = [
        "# qkrank study summary", "",
        f"Grid: scales {', '.join(grid.scales)}; modes {', '.join(grid.modes)}; optimizers "
        f"{', '.join(grid.optimizers)}; seeds {', '.join(map(str, grid.seeds))} ({len(qconfig.cells(config))} "
        "cells). "
        "Modes: " + "; ".join(f"`{m}` = {MODE_LABELS[m]}" for m in grid.modes) + ".", "",
        f"PR = (Σσ)²/Σσ² of the key vectors of one head at site `{agg.site}`; \"mean PR\" averages layers and "
        f"heads. Intervals: {agg.ci_level:.0%} Student-t over seeds (none with one seed). Token marks: {marks} "
        "(nearest checkpoint used, named in each table).", "",
        "## Verdict (seed 004 §2)", "",
        *verdict_headline(verdicts), *suites.verdict_note(config), "",
        f"Rule (docs/verdict.md): per pair of modes, the per-seed differences (same seed, scale and optimizer) "
        f"are tested with δ = {agg.verdict_margin:.0%} of the pair's mean: *equivalent* when the paired TOST "
        f"shows the difference inside ±δ (the {1 - 2 * agg.verdict_alpha:.0%} interval inside ±δ), *different* "
        "when a minimum-effect test shows it beyond δ and the paired interval excludes 0; the three decisions are "
        f"Holm-controlled at α = {agg.verdict_alpha:g}. A: learned differs from frozen and none, which are "
        "equivalent; B: learned ≈ frozen, none differs from both; C: all three differ; anything else, or fewer "
        "than two seeds, is undetermined. Evidence:", "",
        (tables / "verdict.md").read_text().strip(), "",
    ]
    for heading, name, note in TABLE_SECTIONS:
        lines += [f"## {heading}", "", note, "", (tables / name).read_text().strip(), ""]
    lines += ["## Figures", "", *figure_section(figures, results, captions, out)]
    lines += ["## Files", "", "Tables (CSV for machines, Markdown for people) are in "
              f"`{os.path.relpath(tables, out.parent)}/`; the verdict with its numbers is "
              f"`{os.path.relpath(results / 'verdict.json', out.parent)}`; docs/outputs.md describes every column.",
              ""]
    return "\n".join(lines)


def markdown_html(text: str, title: str) -> str:
    """The summary's Markdown as a standalone HTML page (markdown-it-py, CommonMark with tables).

    Images become a line naming the figure (the report shows the figures themselves).
    """
    from markdown_it import MarkdownIt

    text = re.sub(r"^!\[([^]]*)\]\([^)]+\)$", r"*[figure: \1 — in the report's figure menu]*", text, flags=re.M)
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    style = ("body{font-family:sans-serif;max-width:70em;margin:1em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
             "th{background:#f0f0f0}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + body + "</body></html>\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the study's summary page (Markdown).")
    qconfig.add_config_args(parser)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--captions", type=Path, required=True, help="folder of the figure captions (.rst)")
    parser.add_argument("--figures", type=Path, nargs="*", default=[], help="figure PNGs, in display order")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--html", type=Path, help="also write the page as HTML (figures left out)")
    args = parser.parse_args(argv)
    try:
        study = StudySettings.from_dict(qconfig.load_from_args(args))
        text = render(study, args.results, args.figures, args.captions, args.out)
    except (qconfig.ConfigError, SummaryError, FileNotFoundError) as e:
        sys.exit(f"qkrank.summary: error: {e}")
    atomic_write_text(args.out, text)
    if args.html:
        atomic_write_text(args.html, markdown_html(text, "qkrank study summary"))


if __name__ == "__main__":
    main()
