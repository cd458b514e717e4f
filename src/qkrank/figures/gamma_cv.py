"""Figure 5a: γ coefficient of variation per layer at the final checkpoint, learned vs frozen (seed 004 §5)."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.figures import style
from qkrank.figures.labels import TENSOR_LABELS

TITLE = "γ coefficient of variation by layer (final checkpoint)"
DODGE = 0.3  # horizontal offset between modes at one layer, in layers


def plot(gamma_cv_final: pd.DataFrame) -> p9.ggplot:
    if gamma_cv_final.empty:
        return style.empty_plot(TITLE, "No mode of this study has a QK-Norm γ.")
    frame = style.with_band(style.facet_label(style.ordered_modes(gamma_cv_final)))
    frame["tensor"] = pd.Categorical([f"γ of the {TENSOR_LABELS[t]} norm" for t in frame.tensor],
                                     categories=[f"γ of the {TENSOR_LABELS[t]} norm" for t in ("q", "k")])
    position = p9.position_dodge(width=DODGE)
    facets = ["tensor"] if frame.panel.nunique() == 1 else ["panel", "tensor"]
    return (p9.ggplot(frame, p9.aes("layer", "mean", color="mode", group="mode"))
            + p9.geom_hline(yintercept=0, color="#999999", size=0.4)
            + p9.geom_line(position=position, alpha=0.6)
            + p9.geom_pointrange(p9.aes(ymin="low", ymax="high"), position=position, size=0.4)
            + p9.facet_wrap(facets, ncol=2)
            + style.mode_scales()
            + p9.scale_x_continuous(name="Layer", breaks=style.layer_breaks(frame.layer))
            + p9.labs(y="CV of γ = std(γ) / mean(γ)", title=TITLE,
                      subtitle=f"Mean over seeds; {style.band_note(frame, 'bars')}\n"
                               "Frozen γ = 1 has CV 0 exactly; no QK-Norm has no γ")
            + style.theme())


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "gamma_cv_final.csv")), args.out)


if __name__ == "__main__":
    main()
