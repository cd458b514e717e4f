"""Reading a study: every probe file and training log of the config's cells → tidy frames (one open per file)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from qkrank import config as qconfig
from qkrank.layout import attrs_problem, probe_path
from qkrank.rank import METRICS, top_energy_share
from qkrank.settings import StudySettings

CELL_COLUMNS = ["scale", "mode", "optimizer", "seed"]
GROUP_COLUMNS = ["scale", "mode", "optimizer"]  # a curve or table column: one mode, all its seeds


class AggregateError(RuntimeError):
    pass


IDENT_COLUMNS = CELL_COLUMNS + ["tokens_seen"]
FRAME_COLUMNS = {
    # pr pools n = pr_n vectors per head; pr_seq is the mean of one PR per probe sequence, n = pr_seq_n (seq_len);
    # the weight site's n is d_model and it has no pr_seq (docs/hdf5.md).
    "probes": IDENT_COLUMNS + ["layer", "head", "tensor", "site", *METRICS, "pr_seq", "pr_n", "pr_seq_n",
                               "top_energy_share"],
    "gamma": IDENT_COLUMNS + ["layer", "tensor", "dim", "gamma"],
    # site: the probed activations' spectrum site (roped by default) and "weight" (W_Q / W_K per head)
    "spectra": IDENT_COLUMNS + ["layer", "depth", "tensor", "site", "head", "index", "sv", "sv_normalized"],
    "dim_energy": IDENT_COLUMNS + ["layer", "tensor", "site", "dim", "energy"],
}
WEIGHT_SITE = "weight"
ENERGY_SITES = ("proj", "normed")  # per-dimension energy of the stored vectors (γ acts between the two)


def _frame(columns: dict[str, list[np.ndarray]], ident: dict) -> pd.DataFrame:
    """One frame from per-block column arrays, the file's identity repeated on every row."""
    data = {k: np.concatenate(v) if v else np.array([]) for k, v in columns.items()}
    n = len(next(iter(data.values())))
    return pd.DataFrame({k: np.repeat(np.asarray([v]), n) for k, v in ident.items()} | data)


def read_probe(path: Path, top_fraction: float, depths: Sequence[int] | None = None,
               spectrum_site: str = "roped") -> dict[str, pd.DataFrame]:
    """One probe file → metric rows (per head), γ rows (per entry) and, given ``depths``, normalised spectra."""
    # qkrank.layout's probe-file check, on the one open of each file
    if not Path(path).is_file():
        raise AggregateError(f"{path}: probe file is missing; run the workflow to probe this checkpoint")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise AggregateError(f"{path}: unreadable HDF5 ({e}); delete it and rerun the workflow to re-probe") from None
    with f:
        if problem := attrs_problem(f.attrs, path):
            raise AggregateError(problem)
        ident = {"scale": str(f.attrs["scale"]), "mode": str(f.attrs["mode"]),
                 "optimizer": str(f.attrs["optimizer"]), "seed": int(f.attrs["seed"]),
                 "tokens_seen": int(f.attrs["tokens_seen"])}
        metric_cols, gamma_cols, spectrum_cols, energy_cols = (
            {k: [] for k in FRAME_COLUMNS[name][len(IDENT_COLUMNS):]}
            for name in ("probes", "gamma", "spectra", "dim_energy"))
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
                    has_seq = "pr_seq" in group
                    metric_cols["pr_seq"].append(np.asarray(group["pr_seq"][()], dtype=float) if has_seq
                                                 else np.full(heads, np.nan))
                    metric_cols["pr_n"].append(np.full(heads, int(group["pr"].attrs.get("n", -1))))
                    metric_cols["pr_seq_n"].append(np.full(heads, int(group["pr_seq"].attrs["n"]) if has_seq else -1))
                    metric_cols["top_energy_share"].append(top_energy_share(sv, top_fraction))
                    if layer in spectrum_layers and site in (spectrum_site, WEIGHT_SITE):
                        d = sv.shape[1]
                        spectrum_cols["layer"].append(np.full(heads * d, layer))
                        spectrum_cols["depth"].append(np.full(heads * d, spectrum_layers[layer]))
                        spectrum_cols["tensor"].append(np.full(heads * d, tensor))
                        spectrum_cols["site"].append(np.full(heads * d, site))
                        spectrum_cols["head"].append(np.repeat(np.arange(heads), d))
                        spectrum_cols["index"].append(np.tile(np.arange(1, d + 1), heads))
                        spectrum_cols["sv"].append(sv.ravel())
                        spectrum_cols["sv_normalized"].append((sv / sv.max(axis=1, keepdims=True)).ravel())
                    if site in ENERGY_SITES and "act" in group:
                        act = group["act"][()].astype(np.float64)  # (H, n, d)
                        energy = np.mean(act**2, axis=(0, 1))
                        d = len(energy)
                        energy_cols["layer"].append(np.full(d, layer))
                        energy_cols["tensor"].append(np.full(d, tensor))
                        energy_cols["site"].append(np.full(d, site))
                        energy_cols["dim"].append(np.arange(d))
                        energy_cols["energy"].append(energy)
                name = f"gamma_{tensor}"
                if name in layer_group:
                    gamma = layer_group[name][()].ravel()  # hf OLMo-2: (heads, d), one γ per projection entry
                    gamma_cols["layer"].append(np.full(len(gamma), layer))
                    gamma_cols["tensor"].append(np.full(len(gamma), tensor))
                    gamma_cols["dim"].append(np.arange(len(gamma)))
                    gamma_cols["gamma"].append(np.asarray(gamma, dtype=float))
    return {"probes": _frame(metric_cols, ident), "gamma": _frame(gamma_cols, ident),
            "spectra": _frame(spectrum_cols, ident), "dim_energy": _frame(energy_cols, ident)}


def depth_layers(n_layers: int, depths: Sequence[int]) -> dict[int, str]:
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


def collect(study: StudySettings, results: Path) -> dict[str, pd.DataFrame]:
    """Tidy frames of every cell and checkpoint the study names; each probe file is opened once."""
    agg = study.aggregate
    config = study.to_dict()  # a cell's settings are resolved by qkrank.config
    parts = {"probes": [], "gamma": [], "spectra": [], "dim_energy": []}
    losses, checkpoints = [], []
    for cell in qconfig.cells(config):
        settings = qconfig.cell_settings(config, cell)
        tokens_list = qconfig.checkpoint_tokens(settings)
        for tokens in tokens_list:
            frames = read_probe(probe_path(results, cell, tokens), agg.top_fraction,
                                agg.depths if tokens == tokens_list[-1] else None, agg.site)
            for name, frame in frames.items():
                if len(frame):
                    parts[name].append(frame)
        if not qconfig.is_hf_scale(settings):  # a public suite (qkrank.suites) has no training log
            losses.append(read_losses(results, cell))
        checkpoints.append(pd.DataFrame({"scale": cell.scale, "mode": cell.mode, "optimizer": cell.optimizer,
                                         "seed": cell.seed, "tokens_seen": tokens_list}))
    out = {name: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=FRAME_COLUMNS[name])
           for name, frames in parts.items()}
    from qkrank.metrics import COLUMNS as LOSS_COLUMNS

    out["losses"] = (pd.concat(losses, ignore_index=True) if losses
                     else pd.DataFrame(columns=CELL_COLUMNS + list(LOSS_COLUMNS)))
    out["checkpoints"] = pd.concat(checkpoints, ignore_index=True)
    return out

