"""Figure 6: mean query PR beside mean key PR over training, per mode (seed 004 next step "measure query PR")."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.figures import style

TENSOR_PANELS = {"q": "Queries Q (all heads)", "k": "Keys K (KV heads)"}


def plot(mean_pr_ci: pd.DataFrame) -> p9.ggplot:
    frame = style.with_band(style.facet_label(style.ordered_modes(mean_pr_ci)))
    frame["tensor"] = pd.Categorical(frame.tensor.map(TENSOR_PANELS), categories=list(TENSOR_PANELS.values()))
    facets = ["tensor"] if frame.panel.nunique() == 1 else ["panel", "tensor"]
    return (p9.ggplot(frame, p9.aes("tokens_seen", "mean", color="mode", fill="mode"))
            + p9.geom_ribbon(p9.aes(ymin="low", ymax="high"), alpha=0.2, color="none")
            + p9.geom_line(size=0.8)
            + p9.geom_point(size=1)
            + p9.facet_wrap(facets, ncol=2)
            + style.mode_scales() + style.tokens_axis(frame.tokens_seen)
            + p9.labs(y="Mean participation ratio PR", title="Query and key rank over training",
                      subtitle=f"PR = (Σσ)²/Σσ², mean over layers, heads and seeds\n{style.band_note(frame)}")
            + style.theme())


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "mean_pr_ci.csv")), args.out)


if __name__ == "__main__":
    main()
