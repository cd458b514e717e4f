"""Paired differences between modes with their intervals, for every compared quantity, and the margin ±δ."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.figures import style
from qkrank.figures.labels import format_tokens

TITLE = "Paired differences between modes (a − b, per-seed differences)"
LABELS = {"initial_mean_pr": "initial PR", "minimum_mean_pr": "minimum PR", "final_mean_pr": "final PR",
          "final_train_loss": "final train loss", "final_val_loss": "final val loss", "mean_pr": "PR",
          "val_loss": "val loss"}


def plot(paired: pd.DataFrame) -> p9.ggplot:
    frame = paired.dropna(subset=["estimate"])
    if frame.empty:
        return style.empty_plot(TITLE, "No pair of modes to compare (one mode or one seed).")
    frame = style.facet_label(frame)
    frame["what"] = [LABELS.get(q, q) + ("" if pd.isna(m) else f" @ {format_tokens(int(m))}")
                     for q, m in zip(frame.quantity, frame.mark_tokens, strict=True)]
    pairs = list(dict.fromkeys(frame.a + " − " + frame.b))  # the table's order: learned−frozen, learned−none, …
    frame["pair"] = pd.Categorical(frame.a + " − " + frame.b, categories=pairs)
    frame["low"] = frame.ci_low.fillna(frame.estimate)
    frame["high"] = frame.ci_high.fillna(frame.estimate)
    frame["kind"] = ["loss" if "loss" in q else "key PR" for q in frame.quantity]
    facets = ["kind"] if frame.panel.nunique() == 1 else ["panel", "kind"]
    level, n = frame.ci_level.iloc[0], int(frame.n_a.min())
    return (p9.ggplot(frame, p9.aes("what", "estimate", color="relation"))
            + p9.geom_hline(yintercept=0, color="#999999", size=0.4)
            + p9.geom_errorbar(p9.aes(ymin="-margin", ymax="margin"), color="#bbbbbb", width=0.5, size=2, alpha=0.5)
            + p9.geom_pointrange(p9.aes(ymin="low", ymax="high"), size=0.4)
            + p9.facet_wrap(["pair"] + facets, ncol=2, scales="free")
            + p9.coord_flip()
            + p9.scale_color_manual(values={"different": "#D55E00", "equivalent": "#009E73",
                                            "unresolved": "#666666"}, name="Decision")
            + p9.labs(x="", y="a − b", title=TITLE,
                      subtitle=f"Mean per-seed difference; bars: {level:.0%} Student-t interval over {n} seeds\n"
                               "(paired); grey bar: the margin ±δ")
            + style.theme(width=9, height=2.5 + 0.25 * frame.what.nunique() * frame.pair.nunique()))


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "paired.csv")), args.out)


if __name__ == "__main__":
    main()
