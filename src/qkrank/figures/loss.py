"""Figure 1: training and validation loss vs tokens per mode, seeds as bands (seed 004 "loss")."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.figures import style

ZOOM_FROM = 0.1  # share of training left out of the plot
SPLIT_LABELS = {"train": "Training (rolling mean of 10 logged steps)", "validation": "Validation"}


def plot(curves: pd.DataFrame) -> p9.ggplot:
    if curves.empty:
        return style.empty_plot("Training and validation loss", "No training losses: every scale of this study is a "
                                "public checkpoint suite, probed but not trained here")
    curves = style.with_band(style.facet_label(style.ordered_modes(curves)))
    # The first steps fall from log(vocab) and would squash the late differences between modes flat.
    curves = curves[curves.tokens_seen >= ZOOM_FROM * curves.groupby("panel").tokens_seen.transform("max")].copy()
    curves["split"] = pd.Categorical(curves["split"].map(SPLIT_LABELS), categories=list(SPLIT_LABELS.values()))
    facets = ["split"] if curves.panel.nunique() == 1 else ["panel", "split"]
    return (p9.ggplot(curves, p9.aes("tokens_seen", "mean", color="mode", fill="mode"))
            + p9.geom_ribbon(p9.aes(ymin="low", ymax="high"), alpha=0.25, color="none")
            + p9.geom_line(size=0.7)
            + p9.facet_wrap(facets, ncol=2, scales="free_y")
            + style.mode_scales() + style.tokens_axis(curves.tokens_seen)
            + p9.labs(y="Cross-entropy loss (nats/token)", title="Training and validation loss",
                      subtitle=f"Mean over seeds; {style.band_note(curves)}\n"
                               f"First {ZOOM_FROM:.0%} of training not shown")
            + style.theme())


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "loss_curves.csv")), args.out)


if __name__ == "__main__":
    main()
