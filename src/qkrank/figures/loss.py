"""Training and validation loss vs tokens per mode; seeds as bands (seed 004 Fig. "loss")."""

from __future__ import annotations

import pandas as pd
import plotnine as p9

from qkrank.figures import style

SMOOTH_STEPS = 10  # rolling mean of the training loss, in logged steps


def curves(losses: pd.DataFrame) -> pd.DataFrame:
    frames = []
    for key, log in losses.groupby(["scale", "optimizer", "mode", "seed"]):
        log = log.sort_values("tokens_seen")
        train = log.dropna(subset=["train_loss"])
        frames.append(pd.DataFrame({"tokens_seen": train.tokens_seen, "loss": train.train_loss.rolling(
            SMOOTH_STEPS, min_periods=1).mean(), "split": "train (smoothed)"}).assign(
            **dict(zip(["scale", "optimizer", "mode", "seed"], key, strict=True))))
        val = log.dropna(subset=["val_loss"])
        frames.append(pd.DataFrame({"tokens_seen": val.tokens_seen, "loss": val.val_loss, "split": "validation"})
                      .assign(**dict(zip(["scale", "optimizer", "mode", "seed"], key, strict=True))))
    frame = pd.concat(frames, ignore_index=True)
    band = (frame.groupby(["scale", "optimizer", "mode", "split", "tokens_seen"], as_index=False)
            .loss.agg(mean="mean", low="min", high="max"))
    return style.facet_label(style.ordered_modes(band))


def plot(losses: pd.DataFrame) -> p9.ggplot:
    band = curves(losses)
    band = band[band.tokens_seen > 0]
    facet = "~split" if band.panel.nunique() == 1 else "panel~split"
    return (p9.ggplot(band, p9.aes("tokens_seen", "mean", color="mode", fill="mode"))
            + p9.geom_ribbon(p9.aes(ymin="low", ymax="high"), alpha=0.2, color="none")
            + p9.geom_line(size=0.8)
            + p9.facet_grid(facet, scales="free_y")
            + style.mode_scales() + style.tokens_axis()
            + p9.labs(y="Cross-entropy loss (nats/token)", title="Training and validation loss",
                      subtitle="band: range over seeds")
            + style.theme())


def main(argv=None) -> None:
    args = style.cli(__doc__).parse_args(argv)
    style.save(plot(pd.read_csv(args.tables / "losses.csv")), args.out)


if __name__ == "__main__":
    main()
