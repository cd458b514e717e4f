"""Figure 3b: key PR of every layer over training for one mode (layer × tokens heatmap, seed-averaged)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotnine as p9

from qkrank.figures import style
from qkrank.figures.labels import MODE_LABELS


def tiles(frame: pd.DataFrame) -> pd.DataFrame:
    """Tile edges halfway between neighbouring checkpoints, so uneven checkpoint spacing draws true widths."""
    tokens = np.sort(frame.tokens_seen.unique()).astype(float)
    edges = np.concatenate([[tokens[0] - (tokens[1] - tokens[0]) / 2 if len(tokens) > 1 else tokens[0] - 0.5],
                            (tokens[1:] + tokens[:-1]) / 2,
                            [tokens[-1] + (tokens[-1] - tokens[-2]) / 2 if len(tokens) > 1 else tokens[0] + 0.5]])
    index = np.searchsorted(tokens, frame.tokens_seen.to_numpy(dtype=float))
    return frame.assign(xmin=edges[index], xmax=edges[index + 1], ymin=frame.layer - 0.5, ymax=frame.layer + 0.5)


def plot(layer_pr: pd.DataFrame, scale: str, optimizer: str, mode: str) -> p9.ggplot:
    keys = style.select(layer_pr[layer_pr.tensor == "k"], scale, optimizer)
    # One colour scale for all modes of this scale and optimizer, so their heatmaps compare by eye.
    limits = (float(keys["mean"].min()), float(keys["mean"].max()))
    frame = tiles(keys[keys["mode"] == mode])
    n_seeds = int(frame.n_seeds.min())
    seeds = f"{n_seeds} seeds" if n_seeds > 1 else "one seed"
    return (p9.ggplot(frame, p9.aes(xmin="xmin", xmax="xmax", ymin="ymin", ymax="ymax", fill="mean"))
            + p9.geom_rect()
            + p9.scale_fill_cmap("viridis", limits=limits, name="Key PR")
            + p9.scale_y_reverse(name="Layer", breaks=style.layer_breaks(keys.layer), expand=(0, 0))
            + style.tokens_axis(keys.tokens_seen, expand=(0, 0))
            + p9.labs(title=f"Key PR by layer over training: {MODE_LABELS[mode]}",
                      subtitle=f"{scale} · {optimizer}; mean over KV heads and {seeds}; "
                               "colour scale shared by all modes")
            + style.theme(height=3.6) + p9.theme(legend_position="right"))


def main(argv=None) -> None:
    args = style.cli(__doc__, per_mode=True).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "layer_pr.csv"), args.scale, args.optimizer, args.mode), args.out)


if __name__ == "__main__":
    main()
