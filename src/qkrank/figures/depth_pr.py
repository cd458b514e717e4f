"""Depth–PR gradient over training (seed 000): Spearman ρ of layer key PR against depth, per mode."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.figures import style

TITLE = "Depth–PR gradient over training"


def plot(depth_pr: pd.DataFrame) -> p9.ggplot:
    frame = depth_pr.dropna(subset=["mean"])
    if frame.empty:
        return style.empty_plot(TITLE, "Too few layers for a rank correlation.")
    frame = style.with_band(style.facet_label(style.ordered_modes(frame)))
    out = (p9.ggplot(frame, p9.aes("tokens_seen", "mean", color="mode", fill="mode"))
            + p9.geom_hline(yintercept=0, color="#999999", size=0.4)
            + p9.geom_ribbon(p9.aes(ymin="low", ymax="high"), alpha=0.2, color="none")
            + p9.geom_line() + p9.geom_point(size=1)
            + style.mode_scales() + style.tokens_axis(frame.tokens_seen)
            + p9.coord_cartesian(ylim=(-1, 1))
            + p9.labs(y="Spearman ρ(layer index, key PR)", title=TITLE,
                      subtitle=f"ρ > 0: deeper layers have higher key PR; {style.band_note(frame)}")
            + style.theme())
    return out if frame.panel.nunique() == 1 else out + p9.facet_wrap(["panel"])


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "depth_pr.csv")), args.out)


if __name__ == "__main__":
    main()
