"""Paired comparisons of every pair of modes for every compared quantity, and the verdicts built from them.

Quantities: the seed 004 summary rows (initial, minimum and final mean key PR, final train and val
loss) and, at each token mark, val loss and mean key PR. Per (scale, optimizer, quantity, mark) the
three pairs are decided together (``qkrank.verdict.scenario``: paired tests, Holm over the pairs).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from qkrank import suites, verdict
from qkrank.collect import CELL_COLUMNS
from qkrank.figures.labels import ordered
from qkrank.tables import SUMMARY_ROWS

MARK_COMPARED = ("val_loss", "mean_pr")
# The verdict's quantity first, then the floor (context), in this order in verdict.json and the summary.
VERDICT_QUANTITIES = {"final_mean_pr": "final mean key PR", "minimum_mean_pr": "minimum mean key PR (collapse floor)"}
PAIR_FIELDS = ("method", "n_a", "n_b", "estimate", "sd", "df", "ci_low", "ci_high", "tost_low", "tost_high", "margin",
               "p_zero", "p_equivalent", "p_different", "p_adjusted", "relation")
PAIRED_COLUMNS = ["scale", "optimizer", "quantity", "mark_tokens", "a", "b", *PAIR_FIELDS, "ci_level", "alpha"]


def compared_values(per_seed: pd.DataFrame, marks_per_seed: pd.DataFrame) -> pd.DataFrame:
    """Long frame: cell, quantity, mark_tokens (NA for whole-run quantities) and value."""
    whole = per_seed.melt(id_vars=CELL_COLUMNS, value_vars=list(SUMMARY_ROWS), var_name="quantity")
    whole["mark_tokens"] = pd.NA
    marks = marks_per_seed.melt(id_vars=CELL_COLUMNS + ["mark_tokens"], value_vars=list(MARK_COMPARED),
                                var_name="quantity")
    # A quantity the probe files do not hold (per-sequence PR of a public suite's files) is not compared.
    out = pd.concat([whole, marks], ignore_index=True).dropna(subset=["value"]).reset_index(drop=True)
    out["mark_tokens"] = out["mark_tokens"].astype("Int64")
    return out


def scenarios(values: pd.DataFrame, level: float, margin: float, alpha: float) -> list[dict]:
    """``verdict.scenario`` for every (scale, optimizer, quantity, mark), with those keys added."""
    out = []
    for (scale, optimizer, quantity, mark), block in values.groupby(
            ["scale", "optimizer", "quantity", "mark_tokens"], sort=False, dropna=False):
        if optimizer == suites.OPTIMIZER:  # a public suite: one run in one mode, nothing to compare it with
            continue
        by_mode = {m: dict(zip(block.loc[block["mode"] == m, "seed"], block.loc[block["mode"] == m, "value"],
                               strict=True)) for m in ordered(block["mode"])}
        out.append({"scale": scale, "optimizer": optimizer, "quantity": quantity,
                    "mark_tokens": None if pd.isna(mark) else int(mark)}
                   | verdict.scenario(by_mode, level, margin, alpha))
    return out


def paired_table(found: list[dict]) -> pd.DataFrame:
    """One row per (scale, optimizer, quantity, mark, pair): the paired evidence and the decision."""
    rows = [{k: s[k] for k in ("scale", "optimizer", "quantity", "mark_tokens")} | {"a": p["a"], "b": p["b"]}
            | {k: p[k] for k in PAIR_FIELDS} | {"ci_level": s["ci_level"], "alpha": s["alpha"]}
            for s in found for p in s["pairs"]]
    frame = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    frame["mark_tokens"] = frame["mark_tokens"].astype("Int64")
    return frame


def verdicts(found: list[dict]) -> list[dict]:
    """The scenario verdicts: final mean key PR, and the same rule at the collapse floor."""
    chosen = [s | {"quantity_label": VERDICT_QUANTITIES[s["quantity"]]} for s in found
              if s["quantity"] in VERDICT_QUANTITIES and s["mark_tokens"] is None]
    order = list(VERDICT_QUANTITIES)
    return sorted(chosen, key=lambda s: (s["scale"], s["optimizer"], order.index(s["quantity"])))


def effect(row, digits: int = 2) -> str:
    """'+6.20 [4.10, 8.30]' (paired difference and its interval); '+6.20' without an interval."""
    if row is None or not np.isfinite(row["estimate"]):
        return "–"
    if not (isinstance(row["ci_low"], float) and math.isfinite(row["ci_low"])):
        return f"{row['estimate']:+.{digits}f}"
    return f"{row['estimate']:+.{digits}f} [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}]"


def json_clean(obj):
    """NaN → None and numpy scalars → Python, for verdict.json."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
