"""Figure 3a: key PR per layer at each mode's final checkpoint, interval over seeds (seed 000 layer breakdowns)."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.figures import style
from qkrank.figures.labels import format_tokens

DODGE = 0.35  # horizontal offset between modes at one layer, in layers


def final_layers(layer_pr: pd.DataFrame) -> pd.DataFrame:
    """Key rows at each (scale, optimizer, mode)'s last checkpoint."""
    keys = layer_pr[layer_pr.tensor == "k"]
    last = keys.groupby(["scale", "optimizer", "mode"]).tokens_seen.transform("max")
    return keys[keys.tokens_seen == last]


def plot(layer_pr: pd.DataFrame) -> p9.ggplot:
    final = style.with_band(style.facet_label(style.ordered_modes(final_layers(layer_pr))))
    position = p9.position_dodge(width=DODGE)
    tokens = ", ".join(sorted({format_tokens(t) for t in final.tokens_seen}))
    g = (p9.ggplot(final, p9.aes("layer", "mean", color="mode", group="mode"))
         + p9.geom_line(position=position, alpha=0.6)
         + p9.geom_pointrange(p9.aes(ymin="low", ymax="high"), position=position, size=0.4)
         + style.mode_scales()
         + p9.scale_x_continuous(name="Layer (0 = nearest the embedding)", breaks=style.layer_breaks(final.layer))
         + p9.labs(y="Key participation ratio PR(K)",
                   title=f"Key PR by layer at the final checkpoint ({tokens} tokens)",
                   subtitle=f"Mean over KV heads and seeds; {style.band_note(final, 'bars')}")
         + style.theme())
    if final.panel.nunique() > 1:
        g += p9.facet_wrap("~panel", scales="free")
    return g


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "layer_pr.csv")), args.out)


if __name__ == "__main__":
    main()
