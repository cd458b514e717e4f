"""Probe HDF5 files and metrics CSVs → tidy tables and the seeds' summary tables.

``python -m qkrank.aggregate --config config.yaml --results results`` writes under ``results/tables/``:
``probes.csv`` (one row per cell, tokens, layer, head, tensor, site; all metrics), ``losses.csv``,
``gamma.csv`` (one row per γ entry), ``mean_pr.csv`` (per cell and tokens: PR averaged over layers and
heads) and ``summary_seed004.{csv,md}`` (seed 004 §3.1, mean ± CI over seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from scipy import stats

from qkrank import config as qconfig
from qkrank.atomic import atomic_path, atomic_write_text
from qkrank.model import SITES, TENSORS
from qkrank.rank import METRICS, top_energy_share

CELL_COLUMNS = ["scale", "mode", "optimizer", "seed"]
FINAL_LOSS_WINDOW = 10  # logged steps averaged for "final train loss"


class AggregateError(RuntimeError):
    pass


def probe_path(results: Path, cell: qconfig.Cell, tokens: int) -> Path:
    return results / "runs" / cell.id / "probe" / f"{tokens}.h5"


def read_probe(path: Path, top_fraction: float) -> tuple[list[dict], list[dict]]:
    """Metric rows and γ rows of one probe file; an unreadable or incomplete file is an error naming it."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise AggregateError(f"{path}: unreadable HDF5 ({e}); delete it and rerun the workflow to re-probe") from None
    with f:
        if not f.attrs.get("complete", False):
            raise AggregateError(f"{path}: incomplete probe file; delete it and rerun the workflow")
        ident = {k: f.attrs[k] for k in ("scale", "mode", "optimizer")} | {
            "seed": int(f.attrs["seed"]), "tokens_seen": int(f.attrs["tokens_seen"])}
        metric_rows, gamma_rows = [], []
        for layer in range(int(f.attrs["n_layers"])):
            for tensor in TENSORS:
                for site in SITES:
                    group = f[f"layers/{layer}/{tensor}/{site}"]
                    values = {m: group[m][()] for m in METRICS}
                    top = top_energy_share(group["sv"][()], top_fraction)
                    for head in range(len(values["pr"])):
                        metric_rows.append({**ident, "layer": layer, "head": head, "tensor": tensor, "site": site,
                                            **{m: float(values[m][head]) for m in METRICS},
                                            "top_energy_share": float(top[head])})
                name = f"layers/{layer}/gamma_{tensor}"
                if name in f:
                    for dim, g in enumerate(f[name][()]):
                        gamma_rows.append({**ident, "layer": layer, "tensor": tensor, "dim": dim, "gamma": float(g)})
    return metric_rows, gamma_rows


def collect(config: dict, results: Path) -> dict[str, pd.DataFrame]:
    """Tidy frames of every cell and checkpoint the config names."""
    top_fraction = config["aggregate"]["top_fraction"]
    metric_rows, gamma_rows, loss_frames = [], [], []
    for cell in qconfig.cells(config):
        settings = qconfig.cell_settings(config, cell)
        for tokens in qconfig.checkpoint_tokens(settings):
            m, g = read_probe(probe_path(results, cell, tokens), top_fraction)
            metric_rows += m
            gamma_rows += g
        metrics_csv = results / "runs" / cell.id / "metrics.csv"
        if not metrics_csv.exists():
            raise AggregateError(f"{metrics_csv} is missing: the cell has not finished training")
        log = pd.read_csv(metrics_csv)
        for col, value in zip(CELL_COLUMNS, (cell.scale, cell.mode, cell.optimizer, cell.seed), strict=True):
            log.insert(CELL_COLUMNS.index(col), col, value)
        loss_frames.append(log)
    probes = pd.DataFrame(metric_rows)
    gamma = pd.DataFrame(gamma_rows, columns=CELL_COLUMNS + ["tokens_seen", "layer", "tensor", "dim", "gamma"])
    return {"probes": probes, "losses": pd.concat(loss_frames, ignore_index=True), "gamma": gamma}


def mean_pr(probes: pd.DataFrame, tensor: str = "k", site: str = "roped", metric: str = "pr") -> pd.DataFrame:
    """Per cell and tokens: ``metric`` averaged over layers and heads (the seeds' "mean PR")."""
    sel = probes[(probes.tensor == tensor) & (probes.site == site)]
    out = sel.groupby(CELL_COLUMNS + ["tokens_seen"], as_index=False)[metric].mean()
    return out.rename(columns={metric: f"mean_{metric}"})


def t_interval(values, level: float) -> tuple[float, float, float, int]:
    """Mean and Student-t confidence interval over seeds; with one value the interval is undefined (NaN)."""
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    n = len(values)
    if n == 0:
        return np.nan, np.nan, np.nan, 0
    mean = float(values.mean())
    if n < 2:
        return mean, np.nan, np.nan, n
    half = stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / np.sqrt(n)
    return mean, mean - half, mean + half, n


def final_train_loss(log: pd.DataFrame) -> float:
    """Mean training loss of the last FINAL_LOSS_WINDOW logged steps (one step is too noisy)."""
    return float(log.dropna(subset=["train_loss"]).sort_values("tokens_seen").train_loss.tail(FINAL_LOSS_WINDOW).mean())


def final_val_loss(log: pd.DataFrame) -> float:
    return float(log.dropna(subset=["val_loss"]).sort_values("tokens_seen").val_loss.iloc[-1])


SUMMARY_ROWS = ("initial_mean_pr", "minimum_mean_pr", "final_mean_pr", "final_train_loss", "final_val_loss")
SUMMARY_LABELS = {"initial_mean_pr": "Initial mean PR", "minimum_mean_pr": "Minimum mean PR",
                  "final_mean_pr": "Final mean PR", "final_train_loss": "Final train loss",
                  "final_val_loss": "Final val loss"}


def per_seed_summary(mean_pr_frame: pd.DataFrame, losses: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: the seed 004 §3.1 quantities of that single run."""
    rows = []
    for key, traj in mean_pr_frame.groupby(CELL_COLUMNS):
        traj = traj.sort_values("tokens_seen")
        log = losses[(losses[CELL_COLUMNS] == pd.Series(key, index=CELL_COLUMNS)).all(axis=1)]
        i_min = traj.mean_pr.idxmin()
        rows.append(dict(zip(CELL_COLUMNS, key, strict=True)) | {
            "initial_mean_pr": traj.mean_pr.iloc[0], "minimum_mean_pr": traj.mean_pr.min(),
            "tokens_at_minimum": int(traj.tokens_seen[i_min]), "final_mean_pr": traj.mean_pr.iloc[-1],
            "final_train_loss": final_train_loss(log), "final_val_loss": final_val_loss(log)})
    return pd.DataFrame(rows)


def summary_table(per_seed: pd.DataFrame, mean_pr_frame: pd.DataFrame, level: float) -> pd.DataFrame:
    """Long table: scale, optimizer, quantity, mode, mean, ci_low, ci_high, n_seeds, tokens_at_minimum."""
    rows = []
    for (scale, optimizer, mode), group in per_seed.groupby(["scale", "optimizer", "mode"], sort=False):
        seed_mean = (mean_pr_frame[(mean_pr_frame.scale == scale) & (mean_pr_frame.optimizer == optimizer)
                                   & (mean_pr_frame["mode"] == mode)]
                     .groupby("tokens_seen").mean_pr.mean())
        for quantity in SUMMARY_ROWS:
            mean, low, high, n = t_interval(group[quantity], level)
            row = {"scale": scale, "optimizer": optimizer, "quantity": quantity, "mode": mode, "mean": mean,
                   "ci_low": low, "ci_high": high, "n_seeds": n, "tokens_at_minimum": None}
            if quantity == "minimum_mean_pr":
                row["tokens_at_minimum"] = int(seed_mean.idxmin())  # of the seed-averaged trajectory
            rows.append(row)
    return pd.DataFrame(rows)


def format_tokens(tokens: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if tokens >= size:
            return f"{tokens / size:.3g}{unit}"
    return str(tokens)


def format_estimate(mean: float, low: float, high: float, n: int, digits: int) -> str:
    if not np.isfinite(mean):
        return "–"
    if n >= 2 and np.isfinite(low):
        return f"{mean:.{digits}f} ± {(high - low) / 2:.{digits}f}"
    return f"{mean:.{digits}f}"


def summary_markdown(summary: pd.DataFrame, modes: list[str], level: float) -> str:
    """Seed 004 §3.1 as Markdown: one table per (scale, optimizer), one column per mode."""
    parts = []
    for (scale, optimizer), block in summary.groupby(["scale", "optimizer"], sort=False):
        n = int(block.n_seeds.max())
        ci_note = f"mean ± half-width of the {level:.0%} Student-t interval over {n} seeds" if n >= 2 else \
            "one seed: no interval"
        lines = [f"**{scale}, {optimizer}** ({ci_note})", "",
                 "| Metric | " + " | ".join(modes) + " |", "|:---|" + ":---:|" * len(modes)]
        for quantity in SUMMARY_ROWS:
            cells = []
            for mode in modes:
                r = block[(block.quantity == quantity) & (block["mode"] == mode)]
                if r.empty:
                    cells.append("–")
                    continue
                r = r.iloc[0]
                text = format_estimate(r["mean"], r.ci_low, r.ci_high, int(r.n_seeds), 2 if "pr" in quantity else 3)
                if quantity == "minimum_mean_pr":
                    text += f" ({format_tokens(int(r.tokens_at_minimum))})"
                cells.append(text)
            lines.append(f"| {SUMMARY_LABELS[quantity]} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def aggregate(config: dict, results: Path) -> dict[str, pd.DataFrame]:
    agg = config["aggregate"]
    frames = collect(config, results)
    tables = results / "tables"
    mpr = mean_pr(frames["probes"], "k", agg["site"])
    per_seed = per_seed_summary(mpr, frames["losses"])
    summary = summary_table(per_seed, mpr, agg["ci_level"])
    write_csv(frames["probes"], tables / "probes.csv")
    write_csv(frames["losses"], tables / "losses.csv")
    write_csv(frames["gamma"], tables / "gamma.csv")
    write_csv(mpr, tables / "mean_pr.csv")
    write_csv(per_seed, tables / "summary_seed004_per_seed.csv")
    write_csv(summary, tables / "summary_seed004.csv")
    atomic_write_text(tables / "summary_seed004.md",
                      summary_markdown(summary, config["grid"]["modes"], agg["ci_level"]))
    return frames | {"mean_pr": mpr, "summary": summary}


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
