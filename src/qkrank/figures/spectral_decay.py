"""Figure 4: normalised singular values of the keys at three depths, final checkpoint (seed 000 "spectral dive")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotnine as p9

from qkrank.figures import style
from qkrank.figures.labels import format_tokens


def curves(spectra: pd.DataFrame) -> pd.DataFrame:
    """Per panel, depth, mode and index i: geometric mean of σ_i/σ_1 over KV heads and seeds, and its range."""
    keys = spectra[spectra.tensor == "k"].assign(log_sv=lambda f: np.log10(f.sv_normalized.clip(lower=1e-12)))
    out = keys.groupby(["scale", "optimizer", "mode", "layer", "depth", "index"], as_index=False).agg(
        log_mean=("log_sv", "mean"), low=("sv_normalized", "min"), high=("sv_normalized", "max"),
        tokens_seen=("tokens_seen", "max"))
    out["mean"] = 10**out.log_mean
    return out


def plot(spectra: pd.DataFrame) -> p9.ggplot:
    frame = style.facet_label(style.ordered_modes(curves(spectra)))
    frame["depth"] = pd.Categorical(frame["depth"], categories=list(dict.fromkeys(
        frame.sort_values("layer")["depth"])))
    facets = ["depth"] if frame.panel.nunique() == 1 else ["panel", "depth"]
    tokens = ", ".join(sorted({format_tokens(t) for t in frame.tokens_seen}))
    return (p9.ggplot(frame, p9.aes("index", "mean", color="mode", fill="mode"))
            + p9.geom_ribbon(p9.aes(ymin="low", ymax="high"), alpha=0.15, color="none")
            + p9.geom_line(size=0.8)
            + p9.facet_wrap(facets, ncol=frame.depth.nunique(), scales="free_x")
            + p9.scale_y_log10(name="Normalised singular value σᵢ / σ₁ (log scale)")
            + p9.scale_x_continuous(name="Singular value index i (1 = largest)")
            + style.mode_scales()
            + p9.labs(title=f"Spectral decay of the keys by depth ({tokens} tokens)",
                      subtitle="Line: geometric mean over KV heads and seeds; band: range over them")
            + style.theme(height=3.8))


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "spectra.csv")), args.out)


if __name__ == "__main__":
    main()
