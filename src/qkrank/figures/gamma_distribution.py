"""Figure 5b: distribution of the γ entries of each layer over training, for one mode (seed 004 §5)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotnine as p9

from qkrank.figures import style
from qkrank.figures.labels import MODE_LABELS, TENSOR_LABELS

MAX_LAYERS = 8  # layers drawn: evenly spaced, first and last always among them
QUANTILES = {"q05": 0.05, "q25": 0.25, "q50": 0.5, "q75": 0.75, "q95": 0.95}


def shown_layers(n_layers: int) -> list[int]:
    """At most MAX_LAYERS layers, evenly spaced from the first to the last."""
    if n_layers <= MAX_LAYERS:
        return list(range(n_layers))
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, MAX_LAYERS)})


def quantiles(gamma: pd.DataFrame) -> pd.DataFrame:
    """Per tokens, layer and tensor: quantiles of the γ entries, pooled over dimensions and seeds."""
    grouped = gamma.groupby(["tokens_seen", "layer", "tensor"]).gamma
    return pd.DataFrame({name: grouped.quantile(q) for name, q in QUANTILES.items()}).reset_index()


def plot(gamma: pd.DataFrame, scale: str, optimizer: str, mode: str) -> p9.ggplot:
    title = f"γ entries by layer over training: {MODE_LABELS[mode]}"
    rows = style.select(gamma, scale, optimizer, mode)
    if rows.empty:
        return style.empty_plot(title, f"{MODE_LABELS[mode]} has no γ in {scale} · {optimizer}.")
    rows = rows[rows.layer.isin(shown_layers(int(rows.layer.max()) + 1))]
    frame = quantiles(rows)
    frame["layer"] = pd.Categorical([f"layer {x}" for x in frame.layer],
                                    categories=[f"layer {x}" for x in sorted(frame.layer.unique())])
    frame["tensor"] = pd.Categorical([f"γ {TENSOR_LABELS[t]}" for t in frame.tensor],
                                     categories=[f"γ {TENSOR_LABELS[t]}" for t in ("q", "k")])
    color = style.MODE_COLORS[mode]
    n_seeds = rows.seed.nunique()
    return (p9.ggplot(frame, p9.aes("tokens_seen"))
            + p9.geom_hline(yintercept=1, color="#999999", size=0.4, linetype="dashed")
            + p9.geom_ribbon(p9.aes(ymin="q05", ymax="q95"), fill=color, alpha=0.2)
            + p9.geom_ribbon(p9.aes(ymin="q25", ymax="q75"), fill=color, alpha=0.4)
            + p9.geom_line(p9.aes(y="q50"), color=color, size=0.7)
            + p9.facet_grid("tensor ~ layer")
            + style.tokens_axis(frame.tokens_seen)
            + p9.labs(y="γ", title=title,
                      subtitle=f"{scale} · {optimizer}; entries of each layer's γ, {n_seeds} "
                               f"seed{'s' if n_seeds > 1 else ''} pooled\n"
                               "line: median; bands: 25–75% and 5–95% of the entries; dashed: initial value 1")
            + style.theme(width=max(7.0, 1.3 * frame.layer.nunique()), height=4.0)
            + p9.theme(axis_text_x=p9.element_text(rotation=45, ha="right")))


def main(argv=None) -> None:
    args = style.cli(__doc__, per_mode=True).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "gamma.csv"), args.scale, args.optimizer, args.mode), args.out)


if __name__ == "__main__":
    main()
