"""What every figure shares: mode colours and labels, the theme, token-axis labels, and saving."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import plotnine as p9

from qkrank.atomic import atomic_path

MODE_COLORS = {"learned": "#D55E00", "frozen": "#0072B2", "none": "#009E73"}
MODE_LABELS = {"learned": "QK-Norm, learned γ", "frozen": "QK-Norm, frozen γ=1", "none": "no QK-Norm"}
FIGURE_FORMATS = ("png", "pdf")


def mode_scales(aesthetics=("color", "fill")) -> list:
    """Consistent colours and legend labels for norm modes across all figures."""
    return [p9.scale_color_manual(values=MODE_COLORS, labels=MODE_LABELS, name="Mode", aesthetics=aesthetics)]


def tokens_axis(name: str = "Tokens seen (millions)") -> p9.scale_x_continuous:
    return p9.scale_x_continuous(name=name, labels=lambda xs: [f"{x / 1e6:g}" for x in xs])


def theme() -> p9.theme:
    return p9.theme_bw(base_size=10) + p9.theme(legend_position="bottom", figure_size=(7, 4.2),
                                                  strip_background=p9.element_rect(fill="#f0f0f0"))


def ordered_modes(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["mode"] = pd.Categorical(frame["mode"], categories=[m for m in MODE_COLORS if m in set(frame["mode"])])
    return frame


def save(plot: p9.ggplot, out: Path) -> None:
    """Write ``out`` (.png) and its .pdf sibling, each atomically."""
    out = Path(out)
    for fmt in FIGURE_FORMATS:
        target = out.with_suffix(f".{fmt}")
        with atomic_path(target) as tmp:
            plot.save(tmp, format=fmt, dpi=200, verbose=False)


def cli(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tables", required=True, type=Path, help="results/tables directory")
    parser.add_argument("--out", required=True, type=Path, help="output .png (a .pdf is written beside it)")
    return parser


def facet_label(frame: pd.DataFrame) -> pd.DataFrame:
    """A 'panel' column naming scale and optimizer, for studies with several of either."""
    frame = frame.copy()
    frame["panel"] = frame["scale"].astype(str) + " · " + frame["optimizer"].astype(str)
    return frame
