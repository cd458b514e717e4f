"""``results/summary.md``: the study's tables and figures in one Markdown page."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qkrank import config as qconfig
from qkrank.atomic import atomic_write_text
from qkrank.figures.style import MODE_LABELS

FIGURE_CAPTIONS = {
    "pr_trajectory": "Mean key participation ratio PR(K) = (Σσ)²/Σσ² over layers and KV heads vs tokens seen.",
    "loss": "Training (smoothed) and validation loss vs tokens seen.",
}


def render(config: dict, results: Path, out: Path) -> str:
    grid = config["grid"]
    tables = results / "tables"
    lines = [
        "# qkrank study summary", "",
        f"Grid: scales {grid['scales']}, modes {grid['modes']}, optimizers {grid['optimizers']}, "
        f"seeds {grid['seeds']} ({len(qconfig.cells(config))} cells).", "",
        "Modes: " + "; ".join(f"`{m}` = {MODE_LABELS[m]}" for m in grid["modes"]) + ".", "",
        "## Seed 004 §3.1 summary", "",
        (tables / "summary_seed004.md").read_text().strip(), "",
        "## Figures", "",
    ]
    for name, caption in FIGURE_CAPTIONS.items():
        png = results / "figures" / f"{name}.png"
        if png.exists():
            lines += [f"![{caption}]({os.path.relpath(png, out.parent)})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    qconfig.add_config_args(parser)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        config = qconfig.load_from_args(args)
    except qconfig.ConfigError as e:
        sys.exit(f"qkrank.summary: error: {e}")
    atomic_write_text(args.out, render(config, args.results, args.out))


if __name__ == "__main__":
    main()
