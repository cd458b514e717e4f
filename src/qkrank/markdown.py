"""Markdown renderings of the seeds' tables (pipe tables via ``DataFrame.to_markdown``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from qkrank.collect import GROUP_COLUMNS
from qkrank.compare import effect
from qkrank.figures.labels import MODE_LABELS, TENSOR_LABELS, format_tokens, ordered
from qkrank.tables import SUMMARY_LABELS, SUMMARY_ROWS


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


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A pipe table's lines: first column left-aligned, the others centred; cells kept as written."""
    frame = pd.DataFrame(rows, columns=header)
    return frame.to_markdown(index=False, tablefmt="pipe", disable_numparse=True,
                             colalign=("left",) + ("center",) * (len(header) - 1)).splitlines()


def _mode_legend(modes) -> str:
    return "; ".join(f"{m} = {MODE_LABELS[m]}" for m in ordered(modes))


def _seeds_row(block: pd.DataFrame, modes: list[str]) -> list[str]:
    return ["Seeds (n)"] + [str(int(block.loc[block["mode"] == m, "n_seeds"].max())) for m in modes]


def _pair_lookup(paired: pd.DataFrame | None, scale, optimizer):
    """Pairs present for one (scale, optimizer) and a function (quantity, mark, a, b) → that pair's row or None."""
    if paired is None or paired.empty:
        return [], lambda *key: None
    block = paired[(paired.scale == scale) & (paired.optimizer == optimizer)]
    pairs = list(dict.fromkeys(zip(block.a, block.b, strict=True)))

    def row(quantity, mark, a, b):
        keep = (block.quantity == quantity) & (block.a == a) & (block.b == b)
        keep &= block.mark_tokens.isna() if mark is None else (block.mark_tokens == mark)
        hit = block[keep.fillna(False)]
        return None if hit.empty else hit.iloc[0]

    return pairs, row


def _pair_note(paired: pd.DataFrame | None) -> str:
    if paired is None or paired.empty:
        return ""
    level = paired.ci_level.iloc[0]
    return (f" Pair columns: mean per-seed difference a − b [{level:.0%} paired t-interval] and the decision "
            "(≈ equivalent, ≠ different, ? unresolved; docs/verdict.md).")


RELATION_MARKS = {"equivalent": "≈", "different": "≠", "unresolved": "?"}


def _pair_cell(r, digits: int) -> str:
    if r is None:
        return "–"
    method = "" if r["method"] == "paired" else " (Welch)"
    return f"{effect(r, digits)} {RELATION_MARKS.get(r['relation'], '')}{method}".strip()


def summary_markdown(summary: pd.DataFrame, level: float, paired: pd.DataFrame | None = None) -> str:
    """Seed 004 §3.1: one table per (scale, optimizer), one column per mode, then one per pair of modes."""
    parts = []
    for (scale, optimizer), block in summary.groupby(["scale", "optimizer"], sort=False):
        modes = ordered(block["mode"])
        # pair columns need an interval: with one seed the mode columns already show the difference
        pairs, pair_row = _pair_lookup(paired if block.n_seeds.min() >= 2 else None, scale, optimizer)
        rows = [_seeds_row(block, modes) + ["" for _ in pairs]]
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
            cells += [_pair_cell(pair_row(quantity, None, a, b), 2 if "pr" in quantity else 3) for a, b in pairs]
            rows.append([SUMMARY_LABELS[quantity]] + cells)
        note = _interval_note(int(block.n_seeds.min()), level)
        sample = {d: int(block.loc[block.pr_definition == d, "pr_sample_n"].max()) for d in ("pooled", "per-sequence")
                  if (block.pr_definition == d).any()} if "pr_definition" in block else {}
        sizes = f"; PR rows: pooled over the probe batch, n = {sample['pooled']:,} key vectors per head" \
            if "pooled" in sample else ""
        if sample.get("per-sequence", -1) > 0:
            sizes += f"; 'per sequence' rows: the mean of one PR per probe sequence, n = {sample['per-sequence']:,}"
        legend = _mode_legend(modes)
        parts.append("\n".join([f"**{scale}, {optimizer}** ({note}; key PR at the configured site{sizes}; the "
                                f"minimum's token count is that of the seed-averaged trajectory). {legend}."
                                f"{_pair_note(paired if pairs else None)}", "",
                                *table(["Metric"] + modes + [f"{a} − {b}" for a, b in pairs], rows)]))
    return "\n\n".join(parts) + "\n"


def paired_markdown(paired: pd.DataFrame) -> str:
    """Every compared quantity (rows) × pair of modes (columns): paired difference, interval and decision."""
    if paired.empty:
        return "No pair of modes to compare (the study has one mode).\n"
    parts = []
    for (scale, optimizer), block in paired.groupby(["scale", "optimizer"], sort=False):
        pairs, pair_row = _pair_lookup(paired, scale, optimizer)
        keys = block[["quantity", "mark_tokens"]].drop_duplicates()
        rows = []
        for quantity, mark in keys.itertuples(index=False):
            mark = None if pd.isna(mark) else int(mark)
            label = SUMMARY_LABELS.get(quantity) or MARK_LABELS[quantity]
            label += f" @ {format_tokens(mark)}" if mark is not None else ""
            rows.append([label] + [_pair_cell(pair_row(quantity, mark, a, b), 3 if "loss" in quantity else 2)
                                   for a, b in pairs])
        methods = set(block.method)
        how = "paired over seeds" if methods == {"paired"} else "paired where the seeds line up, else Welch"
        parts.append("\n".join([f"**{scale}, {optimizer}** (a − b, {how}; each row's three decisions are "
                                f"Holm-controlled at α = {block.alpha.iloc[0]:g}; δ = margin × mean of the pair).",
                                "", *table(["Quantity"] + [f"{a} − {b}" for a, b in pairs], rows)]))
    return "\n\n".join(parts) + "\n"


MARK_LABELS = {"val_loss": "Val loss", "mean_pr": "Mean key PR"}


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
                                f"{_checkpoint_note(block)}. {_mode_legend(modes)}.", "", *table(header, rows)]))
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
                                *table(["What was measured"] + modes, rows)]))
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


def gamma_cv_markdown(final: pd.DataFrame, level: float, all_modes: Sequence[str]) -> str:
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
                                *table(["Layer"] + [f"{m} γ_{t}" for m, t in columns], rows)]))
    return "\n\n".join(parts) + "\n"


def mean_pr_markdown(bands: pd.DataFrame, level: float) -> str:
    """Mean query and key PR vs tokens: one row per checkpoint, columns mode × tensor."""
    parts = []
    for (scale, optimizer), block in bands.groupby(["scale", "optimizer"], sort=False):
        columns, rows = _mode_tensor_grid(block, "tokens_seen", "{:,}".format, 2)
        note = _interval_note(int(block.n_seeds.min()), level)
        parts.append("\n".join([f"**{scale}, {optimizer}** (PR averaged over layers and heads; {note}). "
                                f"{_mode_legend(block['mode'])}.", "",
                                *table(["Tokens seen"] + [f"{m} {TENSOR_LABELS[t]}" for m, t in columns], rows)]))
    return "\n\n".join(parts) + "\n"



def verdict_markdown(results: list[dict]) -> str:
    """Each verdict with its evidence: per-mode intervals, the paired differences and the seeds planner."""
    from qkrank.planner import planner_lines

    if not results:  # only public checkpoint suites, which have one mode each (docs/suites.md)
        return "No scenario verdict: no trained scale has modes to compare.\n"
    parts = []
    for v in results:
        level = v["ci_level"]
        lines = [f"**{v['scale']}, {v['optimizer']} — {v['quantity_label']}: {v['statement']}**", "",
                 f"Reason: {v['reason']}. Point estimates: {v['ordering']}.", ""]
        effects = "; ".join(f"{p['a']} − {p['b']}: {effect(p)}" for p in v["pairs"])
        if effects:
            lines += [f"Paired differences [{level:.0%} interval]: {effects}.", ""]
        mode_rows = [[m, format_estimate(e["mean"], e["ci_low"], e["ci_high"], e["n"], 2),
                      "–" if not np.isfinite(e["ci_low"]) else f"[{e['ci_low']:.2f}, {e['ci_high']:.2f}]", str(e["n"])]
                     for m, e in v["modes"].items()]
        lines += table(["Mode", "Mean", f"{level:.0%} t-interval", "n"], mode_rows)
        if v["pairs"]:
            def num(x, fmt):
                return "–" if x is None or not np.isfinite(x) else format(x, fmt)

            pair_rows = [[f"{p['a']} − {p['b']}", effect(p), p["method"], str(p["n_a"]), num(p["sd"], ".3g"),
                          "–" if not np.isfinite(p["tost_low"]) else f"[{p['tost_low']:+.2f}, {p['tost_high']:+.2f}]",
                          f"±{p['margin']:.2f}", num(p["p_adjusted"], ".3g"), p["relation"]] for p in v["pairs"]]
            lines += ["", *table(["Pair", f"Difference [{level:.0%}]", "Test", "n", "SD of differences",
                                  f"{1 - 2 * v['alpha']:.0%} interval (TOST)", "Margin δ", "p (Holm)", "Relation"],
                                 pair_rows)]
        plan = planner_lines(v) if v["scenario"] == "undetermined" else []
        if plan:
            lines += ["", "Seeds planner: " + "; ".join(plan) + "."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _band(r, digits: int) -> str:
    return _estimate(r, digits) if r is not None else "–"


def analyses_markdown(gamma_pr: pd.DataFrame, gamma_dims: pd.DataFrame, depth: pd.DataFrame,
                      weights: pd.DataFrame, level: float) -> str:
    """The seeds' open analyses, one short section each (final checkpoint where a table would be long)."""
    out = ["**γ–PR relation (seed 004 §5, learned γ).** Spearman ρ of a layer's γ CV against its PR, over all "
           f"layers and checkpoints of one run; mean over seeds ± {level:.0%} t-interval half-width."]
    if gamma_pr.empty:
        out.append("No learned-γ mode in this study.")
    else:
        out += ["", *table(["Scale · optimizer", "γ of", "ρ(CV, PR)", "seeds"],
                           [[f"{r.scale} · {r.optimizer}", TENSOR_LABELS[r.tensor], _band(r, 2), str(int(r.n_seeds))]
                            for _, r in gamma_pr.iterrows()])]
    out += ["", "**Individual γ (learned, final checkpoint).** Share of dimensions amplified (γ > 1); overlap of "
            "the top-k and bottom-k dimensions (k = head_dim // 8) between the earliest checkpoint with distinct "
            "γ and the final one; share of the keys' "
            "energy (before QK-Norm) in the amplified dimensions — larger than the amplified share means γ "
            "amplifies dimensions that already carry more."]
    if gamma_dims.empty:
        out.append("No learned-γ mode in this study.")
    else:
        last = gamma_dims[gamma_dims.tokens_seen == gamma_dims.tokens_seen.max()]
        # overlaps: at the earliest checkpoint where γ is not all equal (at initialisation there is no ranking)
        first = gamma_dims.dropna(subset=["mean"]).sort_values("tokens_seen")
        rows = []
        for (scale, optimizer, layer, tensor), _block in last.groupby(["scale", "optimizer", "layer", "tensor"]):
            def pick(frame, q, scale=scale, optimizer=optimizer, layer=layer, tensor=tensor):
                hit = frame[(frame.scale == scale) & (frame.optimizer == optimizer) & (frame.layer == layer)
                            & (frame.tensor == tensor) & (frame.quantity == q)]
                return hit.iloc[0] if len(hit) else None
            rows.append([f"{scale} · {optimizer}", str(layer), TENSOR_LABELS[tensor],
                         _band(pick(last, "amplified_fraction"), 2), _band(pick(first, "top_overlap"), 2),
                         _band(pick(first, "bottom_overlap"), 2), _band(pick(last, "energy_share_proj"), 2)])
        out += ["", *table(["Scale · optimizer", "Layer", "γ of", "Amplified share", "Top-k overlap first→final",
                            "Bottom-k overlap first→final", "Energy share of amplified dims"], rows)]
    out += ["", "**Depth–PR gradient (seed 000).** Spearman ρ of layer key PR against depth at each checkpoint "
            "(positive: deeper layers have higher PR); the token count where the seed-mean ρ changes sign."]
    rows = []
    for (scale, mode, optimizer), block in depth.groupby(GROUP_COLUMNS, sort=False):
        block = block.sort_values("tokens_seen")
        flip = block.sign_flip_tokens.iloc[0]
        rows.append([f"{scale} · {optimizer}", mode, _band(block.iloc[0], 2), _band(block.iloc[-1], 2),
                     "no flip" if pd.isna(flip) else format_tokens(int(flip))])
    out += ["", *table(["Scale · optimizer", "Mode", "ρ first checkpoint", "ρ final checkpoint", "Sign flips at"],
                       rows)] if rows else ["No layers to compare."]
    out += ["", "**Weight spectra (W_Q, W_K per head).** PR of each head's block of the projection weights, "
            "mean over heads and layers, final checkpoint."]
    if weights.empty:
        out.append("Not in these probe files (written before the weight spectra were added; re-probe to get them).")
    else:
        pr = weights[weights.metric == "pr"]
        final = pr[pr.tokens_seen == pr.tokens_seen.max()]
        per = final.groupby(GROUP_COLUMNS + ["tensor"], as_index=False)[["mean", "n_seeds"]].agg(
            {"mean": "mean", "n_seeds": "min"})
        out += ["", *table(["Scale · optimizer", "Mode", "Weights of", "PR (mean over layers)", "seeds"],
                           [[f"{r.scale} · {r.optimizer}", r["mode"], TENSOR_LABELS[r.tensor], f"{r['mean']:.2f}",
                             str(int(r.n_seeds))] for _, r in per.iterrows()])]
    return "\n".join(out) + "\n"
