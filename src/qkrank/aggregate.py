"""Probe HDF5 files and metrics CSVs → tidy tables, the seeds' tables with intervals, and the verdict.

``python -m qkrank.aggregate --config results/config.json --results results`` reads every probe file
once and writes the files in ``OUTPUTS`` (docs/outputs.md describes each column). Intervals are
Student-t over seeds at ``aggregate.ci_level``; with one seed they are empty and tables show the value.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from scipy import stats

from qkrank import config as qconfig
from qkrank import verdict
from qkrank.atomic import atomic_path, atomic_write_text
from qkrank.figures.labels import MODE_LABELS, TENSOR_LABELS, format_tokens, ordered
from qkrank.probe import SCHEMA_VERSION as PROBE_SCHEMA_VERSION
from qkrank.rank import METRICS, top_energy_share

CELL_COLUMNS = ["scale", "mode", "optimizer", "seed"]
GROUP_COLUMNS = ["scale", "mode", "optimizer"]  # a curve or table column: one mode, all its seeds
FINAL_LOSS_WINDOW = 10  # logged steps averaged for "final train loss"
TRAIN_SMOOTH_STEPS = 10  # rolling mean of the training loss in the loss curves, in logged steps

# Every file the aggregate step writes, relative to the results directory (the workflow's outputs).
TABLE_NAMES = ("probes", "losses", "gamma", "spectra", "mean_pr", "mean_pr_ci", "layer_pr", "loss_curves",
               "gamma_cv", "gamma_cv_final", "summary_seed004_per_seed", "summary_seed004", "marks_per_seed",
               "marks", "paradox")
MARKDOWN_NAMES = ("mean_pr_ci", "gamma_cv_final", "summary_seed004", "marks", "paradox", "verdict")
OUTPUTS = ([f"tables/{n}.csv" for n in TABLE_NAMES] + [f"tables/{n}.md" for n in MARKDOWN_NAMES]
           + ["verdict.json"])


class AggregateError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- reading


def probe_path(results: Path, cell: qconfig.Cell, tokens: int) -> Path:
    return results / "runs" / cell.id / "probe" / f"{tokens}.h5"


IDENT_COLUMNS = CELL_COLUMNS + ["tokens_seen"]
FRAME_COLUMNS = {
    "probes": IDENT_COLUMNS + ["layer", "head", "tensor", "site", *METRICS, "top_energy_share"],
    "gamma": IDENT_COLUMNS + ["layer", "tensor", "dim", "gamma"],
    "spectra": IDENT_COLUMNS + ["layer", "depth", "tensor", "head", "index", "sv", "sv_normalized"],
}


def _frame(columns: dict[str, list[np.ndarray]], ident: dict) -> pd.DataFrame:
    """One frame from per-block column arrays, the file's identity repeated on every row."""
    data = {k: np.concatenate(v) if v else np.array([]) for k, v in columns.items()}
    n = len(next(iter(data.values())))
    return pd.DataFrame({k: np.repeat(np.asarray([v]), n) for k, v in ident.items()} | data)


def read_probe(path: Path, top_fraction: float, depths: list[int] | None = None,
               spectrum_site: str = "roped") -> dict[str, pd.DataFrame]:
    """One probe file → metric rows (per head), γ rows (per entry) and, given ``depths``, normalised spectra."""
    if not Path(path).is_file():
        raise AggregateError(f"{path}: probe file is missing; run the workflow to probe this checkpoint")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise AggregateError(f"{path}: unreadable HDF5 ({e}); delete it and rerun the workflow to re-probe") from None
    with f:
        if not f.attrs.get("complete", False):
            raise AggregateError(f"{path}: incomplete probe file (no 'complete' attribute); delete it and rerun "
                                 "the workflow")
        if f.attrs.get("schema_version") != PROBE_SCHEMA_VERSION:
            raise AggregateError(f"{path}: probe schema version {f.attrs.get('schema_version')}, this qkrank reads "
                                 f"{PROBE_SCHEMA_VERSION}; delete it and rerun the workflow to re-probe")
        ident = {"scale": str(f.attrs["scale"]), "mode": str(f.attrs["mode"]),
                 "optimizer": str(f.attrs["optimizer"]), "seed": int(f.attrs["seed"]),
                 "tokens_seen": int(f.attrs["tokens_seen"])}
        metric_cols, gamma_cols, spectrum_cols = ({k: [] for k in FRAME_COLUMNS[name][len(IDENT_COLUMNS):]}
                                                  for name in ("probes", "gamma", "spectra"))
        n_layers = int(f.attrs["n_layers"])
        spectrum_layers = depth_layers(n_layers, depths) if depths is not None else {}
        for layer in range(n_layers):
            layer_group = f[f"layers/{layer}"]
            for tensor in ("q", "k"):
                for site, group in layer_group[tensor].items():
                    sv = group["sv"][()]
                    heads = sv.shape[0]
                    metric_cols["layer"].append(np.full(heads, layer))
                    metric_cols["head"].append(np.arange(heads))
                    metric_cols["tensor"].append(np.full(heads, tensor))
                    metric_cols["site"].append(np.full(heads, site))
                    for m in METRICS:
                        metric_cols[m].append(np.asarray(group[m][()], dtype=float))
                    metric_cols["top_energy_share"].append(top_energy_share(sv, top_fraction))
                    if layer in spectrum_layers and site == spectrum_site:
                        d = sv.shape[1]
                        spectrum_cols["layer"].append(np.full(heads * d, layer))
                        spectrum_cols["depth"].append(np.full(heads * d, spectrum_layers[layer]))
                        spectrum_cols["tensor"].append(np.full(heads * d, tensor))
                        spectrum_cols["head"].append(np.repeat(np.arange(heads), d))
                        spectrum_cols["index"].append(np.tile(np.arange(1, d + 1), heads))
                        spectrum_cols["sv"].append(sv.ravel())
                        spectrum_cols["sv_normalized"].append((sv / sv.max(axis=1, keepdims=True)).ravel())
                name = f"gamma_{tensor}"
                if name in layer_group:
                    gamma = layer_group[name][()]
                    gamma_cols["layer"].append(np.full(len(gamma), layer))
                    gamma_cols["tensor"].append(np.full(len(gamma), tensor))
                    gamma_cols["dim"].append(np.arange(len(gamma)))
                    gamma_cols["gamma"].append(np.asarray(gamma, dtype=float))
    return {"probes": _frame(metric_cols, ident), "gamma": _frame(gamma_cols, ident),
            "spectra": _frame(spectrum_cols, ident)}


def depth_layers(n_layers: int, depths: list[int]) -> dict[int, str]:
    """Layers for the spectral figure, each with its label; [] = first, middle, last; negatives count from the end."""
    if not depths:
        picks: dict[int, list[str]] = {}
        for layer, name in ((0, "first"), (n_layers // 2, "middle"), (n_layers - 1, "last")):
            picks.setdefault(layer, []).append(name)  # shallow models: one layer can be several depths
        return {layer: f"layer {layer} ({', '.join(names)})" for layer, names in sorted(picks.items())}
    out = {}
    for d in depths:
        layer = d + n_layers if d < 0 else d
        if not 0 <= layer < n_layers:
            raise AggregateError(f"config field 'aggregate.depths': layer {d} does not exist in a model with "
                                 f"{n_layers} layers; use 0..{n_layers - 1} or -{n_layers}..-1")
        out[layer] = f"layer {layer}"
    return dict(sorted(out.items()))


def read_losses(results: Path, cell: qconfig.Cell) -> pd.DataFrame:
    path = results / "runs" / cell.id / "metrics.csv"
    if not path.exists():
        raise AggregateError(f"{path} is missing: the cell has not finished training")
    log = pd.read_csv(path)
    for i, (col, value) in enumerate(zip(CELL_COLUMNS, (cell.scale, cell.mode, cell.optimizer, cell.seed),
                                         strict=True)):
        log.insert(i, col, value)
    return log


def collect(config: dict, results: Path) -> dict[str, pd.DataFrame]:
    """Tidy frames of every cell and checkpoint the config names; each probe file is opened once."""
    agg = config["aggregate"]
    parts = {"probes": [], "gamma": [], "spectra": []}
    losses, checkpoints = [], []
    for cell in qconfig.cells(config):
        settings = qconfig.cell_settings(config, cell)
        tokens_list = qconfig.checkpoint_tokens(settings)
        for tokens in tokens_list:
            frames = read_probe(probe_path(results, cell, tokens), agg["top_fraction"],
                                agg["depths"] if tokens == tokens_list[-1] else None, agg["site"])
            for name, frame in frames.items():
                if len(frame):
                    parts[name].append(frame)
        losses.append(read_losses(results, cell))
        checkpoints.append(pd.DataFrame({"scale": cell.scale, "mode": cell.mode, "optimizer": cell.optimizer,
                                         "seed": cell.seed, "tokens_seen": tokens_list}))
    out = {name: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=FRAME_COLUMNS[name])
           for name, frames in parts.items()}
    out["losses"] = pd.concat(losses, ignore_index=True)
    out["checkpoints"] = pd.concat(checkpoints, ignore_index=True)
    return out


# ------------------------------------------------------------------------------------------ statistics


def seed_bands(frame: pd.DataFrame, keys: list[str], value: str, level: float) -> pd.DataFrame:
    """Per group of ``keys``: mean of ``value`` over seeds, Student-t interval (NaN if n < 2) and n."""
    clean = frame.dropna(subset=[value])
    out = clean.groupby(keys, sort=True, observed=True)[value].agg(mean="mean", sd="std", n_seeds="count")
    out = out.reset_index()
    n = out["n_seeds"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = np.where(n >= 2, stats.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)) * out["sd"] / np.sqrt(n),
                        np.nan)
    out["ci_low"] = out["mean"] - half
    out["ci_high"] = out["mean"] + half
    out["ci_level"] = level
    return out[keys + ["mean", "ci_low", "ci_high", "n_seeds", "ci_level"]]


def mean_pr(probes: pd.DataFrame) -> pd.DataFrame:
    """Per cell, tokens, tensor and site: each metric averaged over layers and heads (the seeds' "mean PR")."""
    out = probes.groupby(CELL_COLUMNS + ["tokens_seen", "tensor", "site"], as_index=False)[list(METRICS)].mean()
    return out.rename(columns={m: f"mean_{m}" for m in METRICS})


def key_mean_pr(mpr: pd.DataFrame, site: str) -> pd.DataFrame:
    sel = mpr[(mpr.tensor == "k") & (mpr.site == site)]
    return sel[CELL_COLUMNS + ["tokens_seen", "mean_pr"]].reset_index(drop=True)


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

SUMMARY_ROWS = ("initial_mean_pr", "minimum_mean_pr", "final_mean_pr", "final_train_loss", "final_val_loss")
SUMMARY_LABELS = {"initial_mean_pr": "Initial mean PR", "minimum_mean_pr": "Minimum mean PR",
                  "final_mean_pr": "Final mean PR", "final_train_loss": "Final train loss",
                  "final_val_loss": "Final val loss"}


def per_seed_summary(kpr: pd.DataFrame, losses: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: the seed 004 §3.1 quantities of that single run."""
    rows = []
    logs = dict(iter(losses.groupby(CELL_COLUMNS)))
    for key, traj in kpr.groupby(CELL_COLUMNS):
        traj = traj.sort_values("tokens_seen")
        log = logs[key]
        i_min = traj.mean_pr.idxmin()
        rows.append(dict(zip(CELL_COLUMNS, key, strict=True)) | {
            "initial_mean_pr": traj.mean_pr.iloc[0], "minimum_mean_pr": traj.mean_pr.min(),
            "tokens_at_minimum": int(traj.tokens_seen[i_min]), "final_mean_pr": traj.mean_pr.iloc[-1],
            "final_tokens": int(traj.tokens_seen.iloc[-1]),
            "final_train_loss": final_train_loss(log), "final_val_loss": final_val_loss(log)})
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
    out["tokens_at_minimum"] = out["tokens_at_minimum"].astype("Int64")
    rank = out.quantity.map({q: i for i, q in enumerate(SUMMARY_ROWS)})  # the seed's row order
    return out.assign(rank=rank).sort_values(["scale", "optimizer", "rank"], kind="stable").drop(
        columns="rank").reset_index(drop=True)


# --------------------------------------------------------------------------------- seed 000 mark tables

MARK_QUANTITIES = ("val_loss", "mean_pr", "layer_pr_min", "layer_pr_max", "spectral_concentration")


def nearest_checkpoint(mark: int, checkpoints) -> int:
    """The checkpoint closest to ``mark`` tokens (the earlier one on a tie)."""
    return int(min(checkpoints, key=lambda c: (abs(c - mark), c)))


def resolve_marks(marks: list[int], checkpoints: pd.DataFrame, marks_from: list[str] = ()) -> pd.DataFrame:
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


# ----------------------------------------------------------------------------------------- markdown


def format_estimate(mean: float, low: float, high: float, n: int, digits: int) -> str:
    """'mean ± half-width' with ≥2 seeds, else 'mean'; '–' for a missing value."""
    if mean is None or not np.isfinite(mean):
        return "–"
    if n >= 2 and np.isfinite(low):
        return f"{mean:.{digits}f} ± {(high - low) / 2:.{digits}f}"
    return f"{mean:.{digits}f}"


def _estimate(row: pd.Series, digits: int) -> str:
    return format_estimate(row["mean"], row.ci_low, row.ci_high, int(row.n_seeds), digits)


def _interval_note(n_seeds: int, level: float) -> str:
    if n_seeds >= 2:
        return f"mean ± half-width of the {level:.0%} Student-t interval over n = {n_seeds} seeds"
    return "one seed per mode: values, no interval"


def _table(header: list[str], rows: list[list[str]], align: str = ":---:") -> list[str]:
    return ["| " + " | ".join(header) + " |", "|:---|" + f"{align}|" * (len(header) - 1)] + [
        "| " + " | ".join(r) + " |" for r in rows]


def _mode_legend(modes) -> str:
    return "; ".join(f"{m} = {MODE_LABELS[m]}" for m in ordered(modes))


def _seeds_row(block: pd.DataFrame, modes: list[str]) -> list[str]:
    return ["Seeds (n)"] + [str(int(block.loc[block["mode"] == m, "n_seeds"].max())) for m in modes]


def summary_markdown(summary: pd.DataFrame, level: float) -> str:
    """Seed 004 §3.1: one table per (scale, optimizer), one column per mode."""
    parts = []
    for (scale, optimizer), block in summary.groupby(["scale", "optimizer"], sort=False):
        modes = ordered(block["mode"])
        rows = [_seeds_row(block, modes)]
        for quantity in SUMMARY_ROWS:
            cells = []
            for mode in modes:
                r = block[(block.quantity == quantity) & (block["mode"] == mode)]
                if r.empty:
                    cells.append("–")
                    continue
                r = r.iloc[0]
                text = _estimate(r, 2 if "pr" in quantity else 3)
                if quantity == "minimum_mean_pr" and pd.notna(r.tokens_at_minimum):
                    text += f" ({format_tokens(int(r.tokens_at_minimum))})"
                cells.append(text)
            rows.append([SUMMARY_LABELS[quantity]] + cells)
        note = _interval_note(int(block.n_seeds.min()), level)
        parts.append("\n".join([f"**{scale}, {optimizer}** ({note}; key PR at the configured site; the minimum's "
                                f"token count is that of the seed-averaged trajectory). {_mode_legend(modes)}.", "",
                                *_table(["Metric"] + modes, rows)]))
    return "\n\n".join(parts) + "\n"


def _checkpoint_note(block: pd.DataFrame) -> str:
    pairs = block[["mark_tokens", "checkpoint_tokens"]].drop_duplicates().sort_values("mark_tokens")
    return ", ".join(f"{format_tokens(m)} → {format_tokens(c)} ({c:,} tokens)"
                     for m, c in pairs.itertuples(index=False))


def _mark_cell(block: pd.DataFrame, mode: str, mark: int, quantity: str, digits: int) -> str:
    r = block[(block["mode"] == mode) & (block.mark_tokens == mark) & (block.quantity == quantity)]
    return "–" if r.empty else _estimate(r.iloc[0], digits)


def marks_markdown(marks: pd.DataFrame, level: float) -> str:
    """Seed 000 §1–2: per mode, val loss and mean key PR at each mark, and the PR change between marks."""
    parts = []
    for (scale, optimizer), block in marks.groupby(["scale", "optimizer"], sort=False):
        modes, mark_list = ordered(block["mode"]), sorted(block.mark_tokens.unique())
        header = ["Mode"] + [f"Val loss @ {format_tokens(m)}" for m in mark_list] + \
            [f"Mean key PR @ {format_tokens(m)}" for m in mark_list]
        if len(mark_list) > 1:
            header.append(f"PR change {format_tokens(mark_list[0])} → {format_tokens(mark_list[-1])}")
        rows = []
        for mode in modes:
            row = [mode] + [_mark_cell(block, mode, m, "val_loss", 3) for m in mark_list] + \
                [_mark_cell(block, mode, m, "mean_pr", 2) for m in mark_list]
            if len(mark_list) > 1:
                pr = block[(block["mode"] == mode) & (block.quantity == "mean_pr")].set_index("mark_tokens")["mean"]
                row.append(f"{pr[mark_list[-1]] - pr[mark_list[0]]:+.2f}")
            rows.append(row)
        note = _interval_note(int(block.n_seeds.min()), level)
        parts.append("\n".join([f"**{scale}, {optimizer}** ({note}). Marks → nearest checkpoint used: "
                                f"{_checkpoint_note(block)}. {_mode_legend(modes)}.", "", *_table(header, rows)]))
    return "\n\n".join(parts) + "\n"


def paradox_markdown(marks: pd.DataFrame, level: float, top_fraction: float) -> str:
    """Seed 000 §5 'the paradox': loss and structure side by side, one column per mode."""
    parts = []
    for (scale, optimizer), block in marks.groupby(["scale", "optimizer"], sort=False):
        modes, mark_list = ordered(block["mode"]), sorted(block.mark_tokens.unique())
        last = mark_list[-1]
        rows = [[f"Val loss ({format_tokens(m)})"] + [_mark_cell(block, mode, m, "val_loss", 3) for mode in modes]
                for m in mark_list]
        rows += [[f"Mean key PR ({format_tokens(m)})"] + [_mark_cell(block, mode, m, "mean_pr", 2)
                                                          for mode in modes] for m in mark_list]
        rows.append([f"Layer uniformity: min / max layer PR ({format_tokens(last)})"] + [
            f"{_mark_cell(block, mode, last, 'layer_pr_min', 1)} / {_mark_cell(block, mode, last, 'layer_pr_max', 1)}"
            for mode in modes])
        rows.append([f"Spectral concentration: share of σ² in top {top_fraction:.0%} of dims ({format_tokens(last)})"]
                    + [_mark_cell(block, mode, last, "spectral_concentration", 3) for mode in modes])
        note = _interval_note(int(block.n_seeds.min()), level)
        parts.append("\n".join([f"**{scale}, {optimizer}** ({note}). Marks → nearest checkpoint used: "
                                f"{_checkpoint_note(block)}. {_mode_legend(modes)}.", "",
                                *_table(["What was measured"] + modes, rows)]))
    return "\n\n".join(parts) + "\n"


def _mode_tensor_grid(block: pd.DataFrame, row_key: str, row_label, digits: int):
    """Columns (mode, tensor) for q and k of every mode, and one row of estimates per value of ``row_key``."""
    columns = [(m, t) for m in ordered(block["mode"]) for t in ("q", "k")]
    rows = []
    for value in sorted(block[row_key].unique()):
        row = [row_label(value)]
        for mode, tensor in columns:
            r = block[(block["mode"] == mode) & (block.tensor == tensor) & (block[row_key] == value)]
            row.append("–" if r.empty else _estimate(r.iloc[0], digits))
        rows.append(row)
    return columns, rows


def gamma_cv_markdown(final: pd.DataFrame, level: float, all_modes: list[str]) -> str:
    """Seed 004 §5: γ CV per layer (rows) for q and k of each mode with γ (columns), at the final checkpoint."""
    without = [m for m in ordered(all_modes) if m not in set(final["mode"])]
    tail = f" {', '.join(without)}: no γ (no QK-Norm)." if without else ""
    if final.empty:
        return f"No mode of this study has γ.{tail}\n"
    parts = []
    for (scale, optimizer), block in final.groupby(["scale", "optimizer"], sort=False):
        columns, rows = _mode_tensor_grid(block, "layer", str, 4)
        note = _interval_note(int(block.n_seeds.min()), level)
        parts.append("\n".join([f"**{scale}, {optimizer}** (CV = std/mean of the γ entries of one layer; {note}; "
                                f"frozen γ = 1 gives exactly 0).{tail} {_mode_legend(block['mode'])}.", "",
                                *_table(["Layer"] + [f"{m} γ_{t}" for m, t in columns], rows)]))
    return "\n\n".join(parts) + "\n"


def mean_pr_markdown(bands: pd.DataFrame, level: float) -> str:
    """Mean query and key PR vs tokens: one row per checkpoint, columns mode × tensor."""
    parts = []
    for (scale, optimizer), block in bands.groupby(["scale", "optimizer"], sort=False):
        columns, rows = _mode_tensor_grid(block, "tokens_seen", "{:,}".format, 2)
        note = _interval_note(int(block.n_seeds.min()), level)
        parts.append("\n".join([f"**{scale}, {optimizer}** (PR averaged over layers and heads; {note}). "
                                f"{_mode_legend(block['mode'])}.", "",
                                *_table(["Tokens seen"] + [f"{m} {TENSOR_LABELS[t]}" for m, t in columns], rows)]))
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------- verdict

VERDICT_QUANTITIES = {"final_mean_pr": "final mean key PR", "minimum_mean_pr": "minimum mean key PR (collapse floor)"}


def verdicts(per_seed: pd.DataFrame, level: float, margin: float) -> list[dict]:
    """The scenario verdict per (scale, optimizer): on final mean key PR, and the same rule at the floor."""
    out = []
    for (scale, optimizer), block in per_seed.groupby(["scale", "optimizer"], sort=False):
        for quantity, label in VERDICT_QUANTITIES.items():
            values = {m: block.loc[block["mode"] == m, quantity].tolist() for m in ordered(block["mode"])}
            out.append({"scale": scale, "optimizer": optimizer, "quantity": quantity, "quantity_label": label}
                       | verdict.scenario(values, level, margin))
    return out


def _json_clean(obj):
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def verdict_markdown(results: list[dict]) -> str:
    """Each verdict with its evidence: per-mode intervals and the three pairwise relations."""
    parts = []
    for v in results:
        level = v["ci_level"]
        lines = [f"**{v['scale']}, {v['optimizer']} — {v['quantity_label']}: {v['statement']}**", "",
                 f"Reason: {v['reason']}. Point estimates: {v['ordering']}.", ""]
        mode_rows = [[m, format_estimate(e["mean"], e["ci_low"], e["ci_high"], e["n"], 2),
                      "–" if not np.isfinite(e["ci_low"]) else f"[{e['ci_low']:.2f}, {e['ci_high']:.2f}]", str(e["n"])]
                     for m, e in v["modes"].items()]
        lines += _table(["Mode", "Mean", f"{level:.0%} t-interval", "n"], mode_rows)
        if v["pairs"]:
            pair_rows = [[f"{p['a']} − {p['b']}", f"{p['difference']:+.2f}",
                          "–" if not np.isfinite(p["difference_ci_low"]) else
                          f"[{p['difference_ci_low']:+.2f}, {p['difference_ci_high']:+.2f}]",
                          f"±{p['margin']:.2f}", p["relation"]] for p in v["pairs"]]
            lines += ["", *_table(["Pair", "Difference", f"{level:.0%} Welch interval", "Margin δ", "Relation"],
                                  pair_rows)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------- writing


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def build_tables(config: dict, frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Every table of OUTPUTS from the collected frames."""
    agg = config["aggregate"]
    level, site = agg["ci_level"], agg["site"]
    mpr = mean_pr(frames["probes"])
    kpr = key_mean_pr(mpr, site)
    per_seed = per_seed_summary(kpr, frames["losses"])
    mpr_site = mpr[mpr.site == site]
    gcv = gamma_cv(frames["gamma"])
    resolved = resolve_marks(agg["marks_tokens"], frames["checkpoints"], agg.get("marks_from", ()))
    marks = marks_per_seed(frames["probes"], frames["losses"], resolved, site)
    marks_long = marks_table(marks, level)
    return {
        "probes": frames["probes"], "losses": frames["losses"], "gamma": frames["gamma"],
        "spectra": frames["spectra"], "mean_pr": mpr,
        "mean_pr_ci": seed_bands(mpr_site, GROUP_COLUMNS + ["tokens_seen", "tensor"], "mean_pr", level),
        "layer_pr": layer_pr(frames["probes"], site, level),
        "loss_curves": loss_curves(frames["losses"], level),
        "gamma_cv": gcv,
        "gamma_cv_final": seed_bands(final_rows(gcv), GROUP_COLUMNS + ["layer", "tensor"], "gamma_cv", level),
        "summary_seed004_per_seed": per_seed,
        "summary_seed004": summary_table(per_seed, kpr, level),
        "marks_per_seed": marks,
        "marks": marks_long,
        "paradox": marks_long[marks_long.mark_tokens.isin([marks_long.mark_tokens.max()])
                              | marks_long.quantity.isin(["val_loss", "mean_pr"])].reset_index(drop=True),
    }


def aggregate(config: dict, results: Path) -> dict:
    agg = config["aggregate"]
    level = agg["ci_level"]
    tables = build_tables(config, collect(config, results))
    found = verdicts(tables["summary_seed004_per_seed"], level, agg["verdict_margin"])
    out = results / "tables"
    for name in TABLE_NAMES:
        write_csv(tables[name], out / f"{name}.csv")
    markdown = {
        "mean_pr_ci": mean_pr_markdown(tables["mean_pr_ci"], level),
        "gamma_cv_final": gamma_cv_markdown(tables["gamma_cv_final"], level, config["grid"]["modes"]),
        "summary_seed004": summary_markdown(tables["summary_seed004"], level),
        "marks": marks_markdown(tables["marks"], level),
        "paradox": paradox_markdown(tables["marks"], level, agg["top_fraction"]),
        "verdict": verdict_markdown(found),
    }
    for name in MARKDOWN_NAMES:
        atomic_write_text(out / f"{name}.md", markdown[name])
    atomic_write_text(results / "verdict.json", json.dumps(_json_clean(found), indent=2, ensure_ascii=False) + "\n")
    return tables | {"verdicts": found}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Aggregate probe files and training logs into tables.")
    qconfig.add_config_args(parser)
    parser.add_argument("--results", type=Path, help="results directory (default: the config's results_dir)")
    args = parser.parse_args(argv)
    try:
        config = qconfig.load_from_args(args)
        aggregate(config, args.results or Path(config["results_dir"]))
    except (qconfig.ConfigError, AggregateError) as e:
        sys.exit(f"qkrank.aggregate: error: {e}")


if __name__ == "__main__":
    main()
