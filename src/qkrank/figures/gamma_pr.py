"""γ–PR relation (seed 004 §5): each layer's γ CV against its PR at every checkpoint, learned γ, one point per seed."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.figures import style
from qkrank.figures.labels import TENSOR_LABELS

TITLE = "γ spread against PR, per layer and checkpoint (learned γ)"


def plot(points: pd.DataFrame, rho: pd.DataFrame) -> p9.ggplot:
    if points.empty:
        return style.empty_plot(TITLE, "No learned-γ mode in this study.")
    frame = style.facet_label(points)
    frame["tensor"] = [f"γ of the {TENSOR_LABELS[t]} norm" for t in frame.tensor]
    frame["layer"] = frame.layer.astype(str)
    notes = "; ".join(f"{TENSOR_LABELS[r.tensor]}: ρ = {r['mean']:+.2f}"
                      + ("" if pd.isna(r.ci_low) else f" [{r.ci_low:+.2f}, {r.ci_high:+.2f}]")
                      for _, r in rho.iterrows()) if len(rho) else ""
    facets = ["tensor"] if frame.panel.nunique() == 1 else ["panel", "tensor"]
    return (p9.ggplot(frame, p9.aes("gamma_cv", "pr", color="layer"))
            + p9.geom_point(p9.aes(size="tokens_seen"), alpha=0.6)
            + p9.facet_wrap(facets, scales="free")
            + p9.scale_size_continuous(range=(0.5, 3), name="Tokens seen")
            + p9.labs(x="CV of γ (std / mean)", y="PR of the layer (mean over heads)", color="Layer", title=TITLE,
                      subtitle=f"Spearman ρ per run, mean over seeds [{style.band_note(rho, 'interval')}]:\n{notes}")
            + style.theme())


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "gamma_pr_points.csv"), pd.read_csv(args.tables / "gamma_pr.csv")),
               args.out)


if __name__ == "__main__":
    main()
