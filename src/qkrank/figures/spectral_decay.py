"""Figure 4: normalised singular values of the keys and of W_K at three depths, final checkpoint (seed 000's
"spectral dive", and its "SVD on the key matrices" read as the weights)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotnine as p9

from qkrank.figures import style
from qkrank.figures.labels import format_tokens

WEIGHT_SITE = "weight"


def source_label(site: str) -> str:
    """The row label of a spectrum: the key activations at their site, or the key projection weights."""
    return "W_K (weights, per KV head)" if site == WEIGHT_SITE else f"keys (activations, {site})"


def curves(spectra: pd.DataFrame) -> pd.DataFrame:
    """Per panel, source, depth, mode and index i: geometric mean of σ_i/σ_1 over KV heads and seeds, and its
    range. Spectra tables from before the weight rows have no ``site`` column: all activations (roped)."""
    spectra = spectra if "site" in spectra else spectra.assign(site="roped")
    keys = spectra[spectra.tensor == "k"].assign(log_sv=lambda f: np.log10(f.sv_normalized.clip(lower=1e-12)))
    out = keys.groupby(["scale", "optimizer", "mode", "site", "layer", "depth", "index"], as_index=False).agg(
        log_mean=("log_sv", "mean"), low=("sv_normalized", "min"), high=("sv_normalized", "max"),
        tokens_seen=("tokens_seen", "max"))
    out["mean"] = 10**out.log_mean
    return out


def plot(spectra: pd.DataFrame) -> p9.ggplot:
    frame = style.facet_label(style.ordered_modes(curves(spectra)))
    frame["depth"] = pd.Categorical(frame["depth"], categories=list(dict.fromkeys(
        frame.sort_values("layer")["depth"])))
    sites = sorted(frame.site.unique(), key=lambda s: s == WEIGHT_SITE)  # activations first, weights below
    frame["source"] = pd.Categorical(frame.site.map(source_label), categories=[source_label(s) for s in sites])
    if frame.panel.nunique() == 1:
        facet = p9.facet_grid("source ~ depth", scales="free_x")
    else:
        facet = p9.facet_wrap(["panel", "source", "depth"], ncol=frame.depth.nunique(), scales="free_x")
    tokens = ", ".join(sorted({format_tokens(t) for t in frame.tokens_seen}))
    weights = "\nTop: the key vectors; bottom: each KV head's block of the weights W_K" if WEIGHT_SITE in sites else ""
    return (p9.ggplot(frame, p9.aes("index", "mean", color="mode", fill="mode"))
            + p9.geom_ribbon(p9.aes(ymin="low", ymax="high"), alpha=0.15, color="none")
            + p9.geom_line(size=0.8)
            + facet
            + p9.scale_y_log10(name="Normalised singular value σᵢ / σ₁ (log scale)")
            + p9.scale_x_continuous(name="Singular value index i (1 = largest)")
            + style.mode_scales()
            + p9.labs(title=f"Spectral decay of the keys and of W_K by depth ({tokens} tokens)",
                      subtitle=f"Line: geometric mean over KV heads and seeds; band: range over them{weights}")
            + style.theme(height=1.2 + 2.6 * frame.source.nunique() * frame.panel.nunique()))


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "spectra.csv")), args.out)


if __name__ == "__main__":
    main()
