"""The seeds' tables: means with Student-t intervals over seeds, the seed 004 summary and the seed 000 marks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from qkrank.collect import CELL_COLUMNS, GROUP_COLUMNS
from qkrank.rank import METRICS

FINAL_LOSS_WINDOW = 10  # logged steps averaged for "final train loss"
TRAIN_SMOOTH_STEPS = 10  # rolling mean of the training loss in the loss curves, in logged steps


def seed_bands(frame: pd.DataFrame, keys: list[str], value: str, level: float) -> pd.DataFrame:
    """Per group of ``keys``: mean of ``value`` over seeds, Student-t interval (NaN if n < 2) and n."""
    clean = frame.dropna(subset=[value]).astype({value: float})
    out = clean.groupby(keys, sort=True, observed=True)[value].agg(mean="mean", sd="std", n_seeds="count")
    out = out.reset_index()
    n = out["n_seeds"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        low, high = stats.t.interval(level, np.maximum(n - 1, 1), loc=out["mean"], scale=out["sd"] / np.sqrt(n))
    out["ci_low"] = np.where(n >= 2, low, np.nan)
    out["ci_high"] = np.where(n >= 2, high, np.nan)
    out["ci_level"] = level
    return out[keys + ["mean", "ci_low", "ci_high", "n_seeds", "ci_level"]]


def mean_pr(probes: pd.DataFrame) -> pd.DataFrame:
    """Per cell, tokens, tensor and site: each metric averaged over layers and heads (the seeds' "mean PR")."""
    keys = CELL_COLUMNS + ["tokens_seen", "tensor", "site"]
    out = probes.groupby(keys, as_index=False)[[*METRICS, "pr_seq"]].mean()
    sizes = probes.groupby(keys, as_index=False)[["pr_n", "pr_seq_n"]].first()
    return out.rename(columns={m: f"mean_{m}" for m in [*METRICS, "pr_seq"]}).merge(sizes, on=keys)


def key_mean_pr(mpr: pd.DataFrame, site: str) -> pd.DataFrame:
    sel = mpr[(mpr.tensor == "k") & (mpr.site == site)]
    return sel[CELL_COLUMNS + ["tokens_seen", "mean_pr", "mean_pr_seq", "pr_n", "pr_seq_n"]].reset_index(drop=True)


def layer_pr(probes: pd.DataFrame, site: str, level: float) -> pd.DataFrame:
    """Per mode, tokens, layer and tensor: PR averaged over heads, then mean ± interval over seeds."""
    sel = probes[probes.site == site]
    per_seed = sel.groupby(CELL_COLUMNS + ["tokens_seen", "layer", "tensor"], as_index=False).pr.mean()
    return seed_bands(per_seed, GROUP_COLUMNS + ["tokens_seen", "layer", "tensor"], "pr", level)


def loss_curves(losses: pd.DataFrame, level: float) -> pd.DataFrame:
    """Train loss (rolling mean over TRAIN_SMOOTH_STEPS logged steps) and val loss, mean ± interval over seeds."""
    frames = []
    for _, log in losses.groupby(CELL_COLUMNS, sort=False):
        train = log.dropna(subset=["train_loss"]).sort_values("tokens_seen")
        frames.append(train[CELL_COLUMNS + ["tokens_seen"]].assign(
            split="train", loss=train.train_loss.rolling(TRAIN_SMOOTH_STEPS, min_periods=1).mean()))
        val = log.dropna(subset=["val_loss"]).sort_values("tokens_seen")
        frames.append(val[CELL_COLUMNS + ["tokens_seen"]].assign(split="validation", loss=val.val_loss))
    if not frames:  # only public suites (no training logs)
        frames = [pd.DataFrame(columns=CELL_COLUMNS + ["tokens_seen", "split", "loss"])]
    return seed_bands(pd.concat(frames, ignore_index=True), GROUP_COLUMNS + ["split", "tokens_seen"], "loss", level)


def gamma_cv(gamma: pd.DataFrame) -> pd.DataFrame:
    """Per cell, tokens, layer and tensor: coefficient of variation of the γ vector, std(γ)/mean(γ) (population std)."""
    cols = CELL_COLUMNS + ["tokens_seen", "layer", "tensor"]
    if gamma.empty:
        return pd.DataFrame(columns=cols + ["gamma_mean", "gamma_std", "gamma_cv"])
    out = gamma.groupby(cols, as_index=False).gamma.agg(gamma_mean="mean", gamma_std=lambda g: g.std(ddof=0))
    out["gamma_cv"] = out.gamma_std / out.gamma_mean
    return out


def final_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of each cell's last checkpoint."""
    last = frame.groupby(CELL_COLUMNS).tokens_seen.transform("max")
    return frame[frame.tokens_seen == last]


def final_train_loss(log: pd.DataFrame) -> float:
    """Mean training loss of the last FINAL_LOSS_WINDOW logged steps (one step is too noisy)."""
    return float(log.dropna(subset=["train_loss"]).sort_values("tokens_seen").train_loss.tail(FINAL_LOSS_WINDOW).mean())


def final_val_loss(log: pd.DataFrame) -> float:
    return float(log.dropna(subset=["val_loss"]).sort_values("tokens_seen").val_loss.iloc[-1])


# ------------------------------------------------------------------------------------ seed 004 summary

SUMMARY_ROWS = ("initial_mean_pr", "minimum_mean_pr", "final_mean_pr", "initial_mean_pr_seq", "final_mean_pr_seq",
                "final_train_loss", "final_val_loss")
SUMMARY_LABELS = {"initial_mean_pr": "Initial mean PR", "minimum_mean_pr": "Minimum mean PR",
                  "final_mean_pr": "Final mean PR",
                  "initial_mean_pr_seq": "Initial mean PR per sequence",
                  "final_mean_pr_seq": "Final mean PR per sequence", "final_train_loss": "Final train loss",
                  "final_val_loss": "Final val loss"}


def per_seed_summary(kpr: pd.DataFrame, losses: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: the seed 004 §3.1 quantities of that single run."""
    rows = []
    logs = dict(iter(losses.groupby(CELL_COLUMNS)))
    for key, traj in kpr.groupby(CELL_COLUMNS):
        traj = traj.sort_values("tokens_seen")
        log = logs.get(key)  # None for a public suite (no training log)
        i_min = traj.mean_pr.idxmin()
        rows.append(dict(zip(CELL_COLUMNS, key, strict=True)) | {
            "initial_mean_pr": traj.mean_pr.iloc[0], "minimum_mean_pr": traj.mean_pr.min(),
            "tokens_at_minimum": int(traj.tokens_seen[i_min]), "final_mean_pr": traj.mean_pr.iloc[-1],
            "initial_mean_pr_seq": traj.mean_pr_seq.iloc[0], "final_mean_pr_seq": traj.mean_pr_seq.iloc[-1],
            "pr_n": int(traj.pr_n.iloc[0]), "pr_seq_n": int(traj.pr_seq_n.iloc[0]),
            "final_tokens": int(traj.tokens_seen.iloc[-1]),
            "final_train_loss": np.nan if log is None else final_train_loss(log),
            "final_val_loss": np.nan if log is None else final_val_loss(log)})
    return pd.DataFrame(rows)


def summary_table(per_seed: pd.DataFrame, kpr: pd.DataFrame, level: float) -> pd.DataFrame:
    """Long table: scale, mode, optimizer, quantity, mean, ci_low, ci_high, n_seeds, ci_level, tokens_at_minimum."""
    long = per_seed.melt(id_vars=CELL_COLUMNS, value_vars=list(SUMMARY_ROWS), var_name="quantity")
    out = seed_bands(long, GROUP_COLUMNS + ["quantity"], "value", level)
    # The minimum's position is read off the seed-averaged trajectory (one token count per mode).
    averaged = kpr.groupby(GROUP_COLUMNS + ["tokens_seen"], as_index=False).mean_pr.mean()
    at_min = averaged.loc[averaged.groupby(GROUP_COLUMNS).mean_pr.idxmin(), GROUP_COLUMNS + ["tokens_seen"]]
    out = out.merge(at_min.rename(columns={"tokens_seen": "tokens_at_minimum"}), on=GROUP_COLUMNS, how="left")
    out.loc[out.quantity != "minimum_mean_pr", "tokens_at_minimum"] = np.nan
    # The sample size behind each PR row: pooled vectors per head, or one probe sequence (docs/hdf5.md).
    sizes = per_seed.groupby(GROUP_COLUMNS, as_index=False)[["pr_n", "pr_seq_n"]].first()
    out = out.merge(sizes, on=GROUP_COLUMNS, how="left")
    out["pr_definition"] = np.where(out.quantity.str.endswith("_pr_seq"), "per-sequence",
                                    np.where(out.quantity.str.contains("_pr"), "pooled", ""))
    out["pr_sample_n"] = np.where(out.pr_definition == "per-sequence", out.pr_seq_n,
                                  np.where(out.pr_definition == "pooled", out.pr_n, -1))
    out = out.drop(columns=["pr_n", "pr_seq_n"])
    out["tokens_at_minimum"] = out["tokens_at_minimum"].astype("Int64")
    rank = out.quantity.map({q: i for i, q in enumerate(SUMMARY_ROWS)})  # the seed's row order
    return out.assign(rank=rank).sort_values(["scale", "optimizer", "rank"], kind="stable").drop(
        columns="rank").reset_index(drop=True)


# --------------------------------------------------------------------------------- seed 000 mark tables

MARK_QUANTITIES = ("val_loss", "mean_pr", "layer_pr_min", "layer_pr_max", "spectral_concentration")


def nearest_checkpoint(mark: int, checkpoints) -> int:
    """The checkpoint closest to ``mark`` tokens (the earlier one on a tie)."""
    return int(min(checkpoints, key=lambda c: (abs(c - mark), c)))


def resolve_marks(marks: Sequence[int], checkpoints: pd.DataFrame, marks_from: Sequence[str] = ()) -> pd.DataFrame:
    """Per cell and mark: the checkpoint used. No marks configured = each cell's final checkpoint.
    ``marks_from`` (aggregate.marks_from): the scale (run) each mark is taken from; other scales skip it."""
    rows = []
    for key, ck in checkpoints.groupby(CELL_COLUMNS, sort=False):
        tokens = sorted(ck.tokens_seen)
        for i, mark in enumerate(marks or [tokens[-1]]):
            if marks and marks_from and marks_from[i] != key[0]:
                continue
            rows.append(dict(zip(CELL_COLUMNS, key, strict=True)) | {
                "mark_tokens": int(mark), "checkpoint_tokens": nearest_checkpoint(mark, tokens)})
    return pd.DataFrame(rows)


def marks_per_seed(probes: pd.DataFrame, losses: pd.DataFrame, marks: pd.DataFrame, site: str) -> pd.DataFrame:
    """Per cell and mark: val loss, mean key PR, min/max layer key PR and spectral concentration at its checkpoint."""
    keys = probes[(probes.tensor == "k") & (probes.site == site)]
    per_layer = keys.groupby(CELL_COLUMNS + ["tokens_seen", "layer"], as_index=False)[
        ["pr", "top_energy_share"]].mean()
    at = per_layer.groupby(CELL_COLUMNS + ["tokens_seen"], as_index=False).agg(
        layer_pr_min=("pr", "min"), layer_pr_max=("pr", "max"), spectral_concentration=("top_energy_share", "mean"))
    mean = keys.groupby(CELL_COLUMNS + ["tokens_seen"], as_index=False).pr.mean().rename(columns={"pr": "mean_pr"})
    val = losses.dropna(subset=["val_loss"]).groupby(CELL_COLUMNS + ["tokens_seen"], as_index=False).val_loss.last()
    out = marks.rename(columns={"checkpoint_tokens": "tokens_seen"})
    for frame in (val, mean, at):
        out = out.merge(frame, on=CELL_COLUMNS + ["tokens_seen"], how="left")
    return out.rename(columns={"tokens_seen": "checkpoint_tokens"})


def marks_table(per_seed: pd.DataFrame, level: float) -> pd.DataFrame:
    long = per_seed.melt(id_vars=CELL_COLUMNS + ["mark_tokens", "checkpoint_tokens"],
                         value_vars=list(MARK_QUANTITIES), var_name="quantity")
    return seed_bands(long, GROUP_COLUMNS + ["mark_tokens", "checkpoint_tokens", "quantity"], "value", level)

