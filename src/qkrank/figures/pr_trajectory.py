"""Figure 2: mean key PR vs tokens per mode, interval band over seeds, minimum marked (seed 004 "key PR causal")."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.figures import style
from qkrank.figures.labels import format_tokens


def minima(bands: pd.DataFrame) -> pd.DataFrame:
    """Each mode's lowest point of the seed-averaged trajectory, with a label 'PR @ tokens'.

    ``right`` says whether the point lies in the right part of its panel, where the label goes to its left.
    """
    rows = bands.loc[bands.groupby(["panel", "mode"], observed=True)["mean"].idxmin()].copy()
    rows["label"] = [f"{m:.1f} @ {format_tokens(t)}" for m, t in zip(rows["mean"], rows.tokens_seen, strict=True)]
    rows["right"] = rows.tokens_seen > 0.6 * bands.groupby("panel").tokens_seen.max().reindex(rows.panel).to_numpy()
    return rows


def minimum_labels(lows: pd.DataFrame, nudge_x: float, nudge_y: float) -> list:
    """Text beside each minimum, on the side with room, just below the marker; one label per distinct text."""
    lows = lows.drop_duplicates(["panel", "label"])
    layers = []
    for right, ha, sign in ((False, "left", 1), (True, "right", -1)):
        rows = lows[lows.right == right]
        if len(rows):
            layers.append(p9.geom_label(p9.aes(label="label"), data=rows, ha=ha, va="top", nudge_x=sign * nudge_x,
                                        nudge_y=-nudge_y, size=7, fill="white", alpha=0.85, label_size=0,
                                        show_legend=False))
    return layers


def plot(mean_pr_ci: pd.DataFrame) -> p9.ggplot:
    bands = mean_pr_ci[mean_pr_ci.tensor == "k"]
    bands = style.with_band(style.facet_label(style.ordered_modes(bands)))
    lows = minima(bands)
    g = (p9.ggplot(bands, p9.aes("tokens_seen", "mean", color="mode", fill="mode"))
         + p9.geom_ribbon(p9.aes(ymin="low", ymax="high"), alpha=0.2, color="none")
         + p9.geom_line(size=0.8)
         + p9.geom_point(size=1.2)
         + p9.geom_point(data=lows, shape="v", size=4, show_legend=False)
         + minimum_labels(lows, 0.01 * bands.tokens_seen.max(), 0.01 * (bands["high"].max() - bands["low"].min()))
         + style.mode_scales() + style.tokens_axis(bands.tokens_seen)
         + p9.labs(y="Mean key participation ratio PR(K)", title="Key rank: collapse and recovery",
                   subtitle=f"PR = (Σσ)²/Σσ², mean over layers and KV heads and over seeds\n"
                            f"{style.band_note(bands)}; ▼ = minimum of each mode's mean trajectory")
         + style.theme())
    if bands.panel.nunique() > 1:
        g += p9.facet_wrap("~panel", scales="free")
    return g


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "mean_pr_ci.csv")), args.out)


if __name__ == "__main__":
    main()
