"""What every figure shares: mode colours and labels, the theme, token axes, interval bands and saving."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import plotnine as p9

from qkrank.atomic import atomic_path
from qkrank.figures.labels import MODE_LABELS, MODE_ORDER

# Okabe–Ito colours: distinguishable with the common colour-vision deficiencies and in greyscale print.
MODE_COLORS = {"learned": "#D55E00", "frozen": "#0072B2", "none": "#009E73"}
FIGURE_FORMATS = ("png", "pdf")
WIDTH_IN, HEIGHT_IN = 7.0, 4.2


def mode_scales(aesthetics=("color", "fill")) -> list:
    """Consistent colours and legend labels for norm modes across all figures."""
    return [p9.scale_color_manual(values=MODE_COLORS, labels=MODE_LABELS, name="Mode", aesthetics=aesthetics,
                                  breaks=list(MODE_ORDER))]


def token_unit(max_tokens: float) -> tuple[float, str]:
    """Axis unit for token counts: millions from 1M on, thousands below (micro studies)."""
    return (1e6, "millions") if max_tokens >= 1e6 else (1e3, "thousands")


def tokens_axis(tokens, name: str = "Tokens seen", **scale_args) -> p9.scale_x_continuous:
    """x axis in tokens seen, labelled in a unit that suits the study's length."""
    size, unit = token_unit(float(np.max(tokens)) if len(tokens) else 0.0)
    return p9.scale_x_continuous(name=f"{name} ({unit})", labels=lambda xs: [f"{x / size:g}" for x in xs],
                                 **scale_args)


def layer_breaks(layers) -> list[int]:
    """Integer ticks for the layers present, at most about 16 of them."""
    n_layers = int(np.max(layers)) + 1 if len(layers) else 1
    return list(range(0, n_layers, max(1, n_layers // 16)))


def theme(width: float = WIDTH_IN, height: float = HEIGHT_IN) -> p9.theme:
    return p9.theme_bw(base_size=10) + p9.theme(
        legend_position="bottom", figure_size=(width, height), plot_title=p9.element_text(weight="bold"),
        strip_background=p9.element_rect(fill="#f0f0f0"), panel_grid_minor=p9.element_blank())


def ordered_modes(frame: pd.DataFrame) -> pd.DataFrame:
    """``mode`` as an ordered categorical (learned, frozen, none), so legends and facets agree."""
    frame = frame.copy()
    frame["mode"] = pd.Categorical(frame["mode"], categories=[m for m in MODE_ORDER if m in set(frame["mode"])])
    return frame


def facet_label(frame: pd.DataFrame) -> pd.DataFrame:
    """A 'panel' column naming scale and optimizer, for studies with several of either."""
    frame = frame.copy()
    frame["panel"] = frame["scale"].astype(str) + " · " + frame["optimizer"].astype(str)
    return frame


def with_band(frame: pd.DataFrame) -> pd.DataFrame:
    """Band limits for plotting: the t-interval where there is one, else the mean (one seed: a line)."""
    frame = frame.copy()
    frame["low"] = frame["ci_low"].where(frame["ci_low"].notna(), frame["mean"])
    frame["high"] = frame["ci_high"].where(frame["ci_high"].notna(), frame["mean"])
    return frame


def band_note(frame: pd.DataFrame, what: str = "band") -> str:
    """Subtitle text saying what the band is: its level (a table column) and the number of seeds."""
    n = int(frame["n_seeds"].min()) if len(frame) else 0
    if n < 2:
        return "one seed per mode: no interval"
    return f"{what}: {frame['ci_level'].iloc[0]:.0%} Student-t interval over {n} seeds"


def empty_plot(title: str, message: str) -> p9.ggplot:
    """A labelled blank figure for a study without the data a figure needs (e.g. no mode with γ)."""
    return (p9.ggplot(pd.DataFrame({"x": [0.0], "y": [0.0], "text": [message]}), p9.aes("x", "y", label="text"))
            + p9.geom_text(size=11) + p9.labs(title=title, x="", y="") + theme(height=2.5)
            + p9.theme(axis_text=p9.element_blank(), axis_ticks=p9.element_blank(), panel_grid=p9.element_blank()))


def save(plot: p9.ggplot, out: Path) -> None:
    """Write ``out`` (.png) and its .pdf sibling, each atomically."""
    out = Path(out)
    for fmt in FIGURE_FORMATS:
        target = out.with_suffix(f".{fmt}")
        with atomic_path(target) as tmp:
            plot.save(tmp, format=fmt, dpi=200, verbose=False)


def cli(description: str, per_mode: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tables", required=True, type=Path, help="results/tables directory")
    parser.add_argument("--out", required=True, type=Path, help="output .png (a .pdf is written beside it)")
    if per_mode:
        parser.add_argument("--scale", required=True)
        parser.add_argument("--optimizer", required=True)
        parser.add_argument("--mode", required=True, choices=list(MODE_ORDER))
    return parser


def select(frame: pd.DataFrame, scale: str, optimizer: str, mode: str | None = None) -> pd.DataFrame:
    """Rows of one (scale, optimizer[, mode]); the arguments come from a per-mode figure's wildcards."""
    keep = (frame["scale"].astype(str) == scale) & (frame["optimizer"].astype(str) == optimizer)
    if mode is not None:
        keep &= frame["mode"].astype(str) == mode
    return frame[keep]

