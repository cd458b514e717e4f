"""Individual γ over training (learned): amplified share, stability of the top/bottom-k dimensions, energy share."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.figures import style
from qkrank.figures.labels import TENSOR_LABELS

TITLE = "Individual γ dimensions over training (learned γ)"
QUANTITIES = {"amplified_fraction": "share of dims with γ > 1",
              "top_overlap": "top-k overlap with final", "bottom_overlap": "bottom-k overlap with final",
              "energy_share_proj": "key energy share of amplified dims"}


def plot(gamma_dims: pd.DataFrame) -> p9.ggplot:
    frame = gamma_dims[gamma_dims.quantity.isin(list(QUANTITIES))].dropna(subset=["mean"]) if len(gamma_dims) \
        else gamma_dims
    if frame.empty:
        return style.empty_plot(TITLE, "No learned-γ mode in this study.")
    frame = style.with_band(style.facet_label(frame))
    frame["quantity"] = pd.Categorical([QUANTITIES[q].replace(" ", "\n", 1) for q in frame.quantity],
                                       categories=[v.replace(" ", "\n", 1) for k, v in QUANTITIES.items()
                                                   if k in set(gamma_dims.quantity)])
    frame["tensor"] = [f"γ_{t} ({TENSOR_LABELS[t]})" for t in frame.tensor]
    frame["layer"] = frame.layer.astype(str)
    rows = "tensor" if frame.panel.nunique() == 1 else "panel + tensor"
    return (p9.ggplot(frame, p9.aes("tokens_seen", "mean", color="layer", fill="layer"))
            + p9.geom_ribbon(p9.aes(ymin="low", ymax="high"), alpha=0.15, color="none")
            + p9.geom_line()
            + p9.facet_grid(f"{rows} ~ quantity", labeller=p9.labeller(cols=p9.label_value, multi_line=True))
            + style.tokens_axis(frame.tokens_seen)
            + p9.coord_cartesian(ylim=(0, 1))
            + p9.labs(y="share", color="Layer", fill="Layer", title=TITLE,
                      subtitle=f"k = max(1, head_dim // 8); energy before QK-Norm; {style.band_note(frame)}")
            + style.theme(width=9, height=4.5))


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "gamma_dims.csv")), args.out)


if __name__ == "__main__":
    main()
