"""The seeds' open analyses as tables: γ–PR relation, individual γ dimensions, depth–PR gradient, weight spectra.

Each analysis is computed per seed (one run) and then summarised over seeds with a Student-t interval
(``tables.seed_bands``), so the spread over seeds is visible (docs/outputs.md lists the columns).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from qkrank.collect import CELL_COLUMNS, GROUP_COLUMNS
from qkrank.rank import METRICS
from qkrank.tables import seed_bands

WEIGHT_SITE = "weight"  # probe files from schema 2 on store W_Q / W_K spectra as this "site" (docs/hdf5.md)


def _spearman(x, y) -> tuple[float, float]:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # two points: ρ = ±1, no p-value
        r = stats.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def layer_means(probes: pd.DataFrame, site: str) -> pd.DataFrame:
    """PR per cell, checkpoint, layer and tensor at ``site``, averaged over heads."""
    sel = probes[probes.site == site]
    return sel.groupby(CELL_COLUMNS + ["tokens_seen", "layer", "tensor"], as_index=False).pr.mean()


def gamma_pr(gamma_cv: pd.DataFrame, probes: pd.DataFrame, site: str, level: float):
    """Seed 004 §5: per run and tensor, Spearman ρ of γ's CV against PR over all (layer, checkpoint) points.

    Learned γ only (frozen γ has CV 0 everywhere). Returns (points, per-seed ρ, ρ over seeds).
    """
    cv = gamma_cv[gamma_cv["mode"] == "learned"]
    points = cv.merge(layer_means(probes, site), on=CELL_COLUMNS + ["tokens_seen", "layer", "tensor"])
    rows = []
    for key, block in points.groupby(CELL_COLUMNS + ["tensor"]):
        rho, p = _spearman(block.gamma_cv.to_numpy(), block.pr.to_numpy())
        rows.append(dict(zip(CELL_COLUMNS + ["tensor"], key, strict=True)) | {"spearman_rho": rho, "p_value": p,
                                                                                 "n_points": len(block)})
    per_seed = pd.DataFrame(rows, columns=CELL_COLUMNS + ["tensor", "spearman_rho", "p_value", "n_points"])
    return points, per_seed, seed_bands(per_seed, GROUP_COLUMNS + ["tensor"], "spearman_rho", level)


def _top_bottom(g: np.ndarray, k: int) -> tuple[set, set]:
    order = np.argsort(g, kind="stable")
    return set(order[-k:].tolist()), set(order[:k].tolist())


def gamma_dims(gamma: pd.DataFrame, energy: pd.DataFrame, level: float):
    """Individual γ (learned mode): amplified (γ > 1) and suppressed dimensions, stability of the top and bottom
    k = max(1, d // 8) over training, and the share of the keys' energy (mean square per dimension, over heads
    and probe tokens) carried by the amplified dimensions, before (``proj``) and after (``normed``) QK-Norm.

    Per run, layer, tensor and checkpoint: n_dims, amplified_fraction, suppressed_fraction, top_overlap and
    bottom_overlap (share of the final checkpoint's top/bottom k also in this checkpoint's; NaN while all γ are
    equal, as at initialisation), and
    energy_share_proj / energy_share_normed (NaN without stored activations). Returns (per seed, over seeds).
    """
    learned = gamma[gamma["mode"] == "learned"]
    keys = CELL_COLUMNS + ["layer", "tensor"]
    energy = energy.pivot_table(index=CELL_COLUMNS + ["tokens_seen", "layer", "tensor", "dim"], columns="site",
                                values="energy").reset_index() if len(energy) else None
    rows = []
    for key, block in learned.groupby(keys):
        by_tokens = {t: b.sort_values("dim").gamma.to_numpy() for t, b in block.groupby("tokens_seen")}
        final = by_tokens[max(by_tokens)]
        k = max(1, len(final) // 8)
        top_final, bottom_final = _top_bottom(final, k)
        for tokens, g in sorted(by_tokens.items()):
            top, bottom = _top_bottom(g, k)
            amplified = g > 1
            ranked = np.ptp(g) > 0 and np.ptp(final) > 0  # all-equal γ (initialisation) has no top or bottom
            row = dict(zip(keys, key, strict=True)) | {
                "tokens_seen": tokens, "n_dims": len(g), "k": k, "amplified_fraction": amplified.mean(),
                "suppressed_fraction": (g < 1).mean(), "top_overlap": len(top & top_final) / k if ranked else np.nan,
                "bottom_overlap": len(bottom & bottom_final) / k if ranked else np.nan}
            for site in ("proj", "normed"):
                share = np.nan
                if energy is not None and site in energy:
                    e = energy
                    sel = e[(e.scale == key[0]) & (e["mode"] == key[1]) & (e.optimizer == key[2]) & (e.seed == key[3])
                            & (e.layer == key[4]) & (e.tensor == key[5]) & (e.tokens_seen == tokens)]
                    if len(sel) == len(g):
                        values = sel.sort_values("dim")[site].to_numpy()
                        share = values[amplified].sum() / values.sum() if amplified.any() else 0.0
                row[f"energy_share_{site}"] = share
            rows.append(row)
    columns = keys + ["tokens_seen", "n_dims", "k", "amplified_fraction", "suppressed_fraction", "top_overlap",
                      "bottom_overlap", "energy_share_proj", "energy_share_normed"]
    per_seed = pd.DataFrame(rows, columns=columns)
    long = per_seed.melt(id_vars=CELL_COLUMNS + ["layer", "tensor", "tokens_seen"],
                         value_vars=columns[len(keys) + 3:], var_name="quantity")
    return per_seed, seed_bands(long, GROUP_COLUMNS + ["layer", "tensor", "tokens_seen", "quantity"], "value", level)


def depth_pr(probes: pd.DataFrame, site: str, level: float):
    """Seed 000's depth gradient: per run and checkpoint, Spearman ρ of key PR per layer against layer index.

    Returns (per seed, over seeds with ``sign_flip_tokens``: the first checkpoint where the seed-mean ρ has
    the opposite sign of the first checkpoint's, NaN if it never flips).
    """
    keys = layer_means(probes, site)
    keys = keys[keys.tensor == "k"]
    rows = []
    for key, block in keys.groupby(CELL_COLUMNS + ["tokens_seen"]):
        rho, p = _spearman(block.layer.to_numpy(), block.pr.to_numpy())
        rows.append(dict(zip(CELL_COLUMNS + ["tokens_seen"], key, strict=True))
                    | {"spearman_rho": rho, "p_value": p, "n_layers": len(block)})
    per_seed = pd.DataFrame(rows, columns=CELL_COLUMNS + ["tokens_seen", "spearman_rho", "p_value", "n_layers"])
    bands = seed_bands(per_seed, GROUP_COLUMNS + ["tokens_seen"], "spearman_rho", level)
    flips = []
    for key, block in bands.groupby(GROUP_COLUMNS):
        signs = np.sign(block.sort_values("tokens_seen")["mean"].to_numpy())
        tokens = block.sort_values("tokens_seen").tokens_seen.to_numpy()
        nonzero = np.nonzero(signs)[0]
        flip = np.nan
        if len(nonzero):
            first = signs[nonzero[0]]
            later = np.nonzero(signs == -first)[0]
            flip = float(tokens[later[0]]) if len(later) else np.nan
        flips.append(dict(zip(GROUP_COLUMNS, key, strict=True)) | {"sign_flip_tokens": flip})
    flip_frame = pd.DataFrame(flips, columns=GROUP_COLUMNS + ["sign_flip_tokens"])
    return per_seed, bands.merge(flip_frame, on=GROUP_COLUMNS, how="left")


def weight_spectra(probes: pd.DataFrame, level: float) -> pd.DataFrame:
    """The four metrics of each head's W_Q / W_K block per layer and checkpoint, mean ± interval over seeds.

    Empty when the probe files hold no weight spectra (schema 1).
    """
    sel = probes[probes.site == WEIGHT_SITE]
    cols = GROUP_COLUMNS + ["tokens_seen", "layer", "tensor", "metric", "mean", "ci_low", "ci_high", "n_seeds",
                            "ci_level"]
    if sel.empty:
        return pd.DataFrame(columns=cols)
    per_layer = sel.groupby(CELL_COLUMNS + ["tokens_seen", "layer", "tensor"], as_index=False)[list(METRICS)].mean()
    long = per_layer.melt(id_vars=CELL_COLUMNS + ["tokens_seen", "layer", "tensor"], value_vars=list(METRICS),
                          var_name="metric")
    return seed_bands(long, GROUP_COLUMNS + ["tokens_seen", "layer", "tensor", "metric"], "value", level)[cols]
