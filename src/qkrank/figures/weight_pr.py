"""Weight spectra: PR of each head's block of W_Q and W_K per layer over training, per mode (probe schema ≥ 2)."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.figures import style
from qkrank.figures.labels import TENSOR_LABELS

TITLE = "PR of the projection weights W_Q and W_K over training"


def plot(weight_spectra: pd.DataFrame) -> p9.ggplot:
    frame = weight_spectra[weight_spectra.metric == "pr"] if len(weight_spectra) else weight_spectra
    if frame.empty:
        return style.empty_plot(TITLE, "No weight spectra in these probe files (re-probe to add them).")
    frame = style.with_band(style.facet_label(style.ordered_modes(frame)))
    frame["tensor"] = pd.Categorical([f"W_{t.upper()} ({TENSOR_LABELS[t]})" for t in frame.tensor],
                                     categories=[f"W_{t.upper()} ({TENSOR_LABELS[t]})" for t in ("q", "k")])
    frame["layer"] = "layer " + frame.layer.astype(str)
    facets = ["tensor", "layer"] if frame.panel.nunique() == 1 else ["panel", "tensor", "layer"]
    return (p9.ggplot(frame, p9.aes("tokens_seen", "mean", color="mode", fill="mode"))
            + p9.geom_ribbon(p9.aes(ymin="low", ymax="high"), alpha=0.2, color="none")
            + p9.geom_line()
            + p9.facet_wrap(facets, scales="free_y", ncol=max(2, frame.layer.nunique()))
            + style.mode_scales() + style.tokens_axis(frame.tokens_seen)
            + p9.labs(y="PR of the head's weight block (mean over heads)", title=TITLE,
                      subtitle=f"Singular values of each head's d × d_model block; {style.band_note(frame)}")
            + style.theme(height=2.0 + 1.6 * frame.tensor.nunique()))


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "weight_spectra.csv")), args.out)


if __name__ == "__main__":
    main()
