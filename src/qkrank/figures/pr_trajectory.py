"""Mean key PR vs tokens per mode, 95% band over seeds, minimum marked (seed 004 "key PR causal")."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.aggregate import t_interval
from qkrank.figures import style


def band_frame(mean_pr: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    rows = []
    for key, group in mean_pr.groupby(["scale", "optimizer", "mode", "tokens_seen"]):
        mean, low, high, n = t_interval(group.mean_pr, level)
        rows.append(dict(zip(["scale", "optimizer", "mode", "tokens_seen"], key, strict=True))
                    | {"mean": mean, "low": low if n > 1 else mean, "high": high if n > 1 else mean, "n": n})
    return style.facet_label(style.ordered_modes(pd.DataFrame(rows)))


def plot(mean_pr: pd.DataFrame) -> p9.ggplot:
    bands = band_frame(mean_pr)
    minima = bands.loc[bands.groupby(["panel", "mode"], observed=True)["mean"].idxmin()]
    n_seeds = int(bands.n.max())
    subtitle = f"mean over layers and KV heads; band: 95% t-interval over {n_seeds} seeds" if n_seeds > 1 \
        else "mean over layers and KV heads; one seed"
    g = (p9.ggplot(bands, p9.aes("tokens_seen", "mean", color="mode", fill="mode"))
         + p9.geom_ribbon(p9.aes(ymin="low", ymax="high"), alpha=0.2, color="none")
         + p9.geom_line(size=0.9)
         + p9.geom_point(data=minima, shape="v", size=3)
         + style.mode_scales() + style.tokens_axis()
         + p9.labs(y="Mean key participation ratio PR(K)", title="Key rank collapse and recovery",
                   subtitle=subtitle + "; ▼ marks each mode's minimum")
         + style.theme())
    if bands.panel.nunique() > 1:
        g += p9.facet_wrap("~panel", scales="free")
    return g


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "mean_pr.csv")), args.out)


if __name__ == "__main__":
    main()
