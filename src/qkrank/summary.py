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

# Table sections in reading order: (heading, file under tables/, what the seed calls it).
TABLE_SECTIONS = (
    ("Seed 004 §3.1 summary", "summary_seed004.md", "Initial, minimum and final mean key PR; final losses."),
    ("Seed 000 token marks", "marks.md", "Validation loss and mean key PR at the configured token marks."),
    ("Seed 000 “paradox” table", "paradox.md", "Loss beside structure: PR, layer uniformity, spectral "
                                                "concentration."),
    ("γ coefficient of variation per layer (seed 004 §5)", "gamma_cv_final.md", "Final checkpoint."),
    ("Mean query and key PR over training", "mean_pr_ci.md", "Every checkpoint."),
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
    """One bullet per (scale, optimizer): the scenario for final mean key PR, then the floor's for context."""
    lines = []
    for v in verdicts:
        if v["quantity"] != "final_mean_pr":
            continue
        floor = next((w for w in verdicts if w["quantity"] == "minimum_mean_pr" and w["scale"] == v["scale"]
                      and w["optimizer"] == v["optimizer"]), None)
        extra = f" At the collapse floor the same rule gives: {floor['scenario']}." if floor else ""
        lines.append(f"- **{v['scale']}, {v['optimizer']}: {v['statement']}** {v['reason']}; point estimates "
                     f"{v['ordering']}.{extra}")
    return lines


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


def render(config: dict, results: Path, figures: list[Path], captions: Path, out: Path) -> str:
    grid, agg = config["grid"], config["aggregate"]
    tables = results / "tables"
    verdicts = json.loads((results / "verdict.json").read_text())
    marks = ", ".join(format_tokens(m) for m in agg["marks_tokens"]) or "the final checkpoint"
    lines = [
        "# qkrank study summary", "",
        f"Grid: scales {', '.join(grid['scales'])}; modes {', '.join(grid['modes'])}; optimizers "
        f"{', '.join(grid['optimizers'])}; seeds {', '.join(map(str, grid['seeds']))} ({len(qconfig.cells(config))} "
        "cells). "
        "Modes: " + "; ".join(f"`{m}` = {MODE_LABELS[m]}" for m in grid["modes"]) + ".", "",
        f"PR = (Σσ)²/Σσ² of the key vectors of one head at site `{agg['site']}`; \"mean PR\" averages layers and "
        f"heads. Intervals: {agg['ci_level']:.0%} Student-t over seeds (none with one seed). Token marks: {marks} "
        "(nearest checkpoint used, named in each table).", "",
        "## Verdict (seed 004 §2)", "",
        *verdict_headline(verdicts), *suites.verdict_note(config), "",
        f"Rule (docs/verdict.md): two modes *differ* when their intervals are disjoint and their means more than "
        f"δ = {agg['verdict_margin']:.0%} of their mean apart; they are *equivalent* when the Welch interval of "
        "their difference lies inside ±δ. A: learned differs from frozen and none, which are equivalent; "
        "B: learned ≈ frozen, none differs from both; C: all three differ; anything else, or fewer than two "
        "seeds, is undetermined. Evidence:", "",
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


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold**, *italic* and `code`."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])", r"<em>\1</em>", text)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_html(text: str, title: str) -> str:
    """The Markdown this module writes as a standalone HTML page: headings, paragraphs, bullets, pipe tables.

    Images become a line naming the figure (the report shows the figures themselves).
    """
    body: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif heading := re.match(r"(#{1,6}) (.*)", line):
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            head, data = rows[0], [r for r in rows[1:] if not all(set(c) <= set(":-") for c in r)]
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in data)
                        + "</tbody></table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
        elif image := re.match(r"!\[([^]]*)\]\(([^)]+)\)", line):
            body.append(f"<p class='figure'>[figure: {_inline(image.group(1))} — in the report's figure menu]</p>")
            i += 1
        else:
            paragraph = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(#{1,6} |\||- |!\[)", lines[i]):
                paragraph.append(lines[i])
                i += 1
            body.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    style = ("body{font-family:sans-serif;max-width:70em;margin:1em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
             "th{background:#f0f0f0}.figure{color:#666}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


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
        config = qconfig.load_from_args(args)
        text = render(config, args.results, args.figures, args.captions, args.out)
    except (qconfig.ConfigError, SummaryError, FileNotFoundError) as e:
        sys.exit(f"qkrank.summary: error: {e}")
    atomic_write_text(args.out, text)
    if args.html:
        atomic_write_text(args.html, markdown_html(text, "qkrank study summary"))


if __name__ == "__main__":
    main()
