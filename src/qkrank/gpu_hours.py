"""A study's plan: GPU-hours of its training, and the disk it needs at its peak and at the end.

``python -m qkrank.gpu_hours configs/*.yaml [--mfu 0.4]`` prints, per config, a Markdown table with one row
per kind of cell (scale, optimizer, token budget, snapshot schedule): GPU-hours, snapshots, resume state, peak
and final disk per cell, and the study's totals. Compute: FLOPs ≈ 6·N·D at a stated share (MFU) of a GPU's
peak; N counts every parameter once (the tied embedding stands for the output projection's matmul);
attention's own FLOPs (12·layers·d_model·seq_len per token) and the probes are left out.

Disk (decimal GB), from the parameter counts: a snapshot is the fp32 weights (4·N bytes); a resume state
adds the optimizer state (Muon: one momentum per hidden-matrix weight; AdamW: two moments per weight), 4
bytes each, and is stored packed (qkrank.state_packing: lossless, PACKED_STATE_RATIO of its plain size). A
cell trains in segments, one per snapshot point (docs/cluster.md, Disk): a segment starts from the previous
one's state file, which also holds its snapshot (weights once), and writes its own, so a cell holds at most two
such files (the one it started from is deleted once its probe and the next segment are done, assuming a probe
takes less time than a segment's training), plus its kept snapshots so far (weights only) and its probe files.
The last segment writes the final snapshot and no state, next to the state it started from. A segment stopped
mid-way (a time limit) adds up to keep_resume_checkpoints + 1 resume states while it runs again; that is not
in the peak. With keep_snapshots: all a cell is one job: up to keep_resume_checkpoints + 1 resume states (the
newest is written before the oldest is pruned; all are deleted when the cell finishes) and every snapshot. At
the end: kept snapshots and probe files. The study's peak is given for all cells training at once (the worst
case) and one cell at a time (the others finished).
"""

from __future__ import annotations

import argparse
import json

from qkrank import config as qconfig

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM, bf16 tensor cores without sparsity
DEFAULT_MFU = 0.40
# Packed ÷ plain bytes of a resume state: 0.835–0.840 for the weights, Muon and AdamW states of the tiny
# default study and of the 88m preset (bench/state_packing.py; docs/cluster.md, Disk). States whose float32
# high bytes were incompressible would pack to 1.0 of their size: then the peaks are those of --packed-ratio 1.
PACKED_STATE_RATIO = 0.84


def training_flops(n_params: int, tokens: int) -> float:
    """C = 6·N·D: forward (2·N) plus backward (4·N) FLOPs per token."""
    return 6.0 * n_params * tokens


def gpu_hours(n_params: int, tokens: int, mfu: float = DEFAULT_MFU, peak_flops: float = H100_BF16_DENSE_FLOPS) -> float:
    """Hours on one GPU: 6·N·D / (MFU · peak FLOP/s) / 3600."""
    return training_flops(n_params, tokens) / (mfu * peak_flops) / 3600.0


def _sizes(model: dict, optimizer: str) -> dict:
    """Parameter counts of a cell's model: all, and those Muon would update (hidden matrices)."""
    from qkrank.model import ModelConfig, build_on_meta
    from qkrank.optim import split_parameters

    fields = {k: v for k, v in model.items() if k != "preset"}
    meta = build_on_meta(ModelConfig.from_preset(model["preset"], **fields))
    hidden = sum(p.numel() for _, p in split_parameters(meta, "muon")["muon"])
    return {"n_params": meta.num_params(), "n_hidden": hidden, "cfg": meta.cfg}


def probe_file_bytes(cfg, n_sequences: int) -> int:
    """One probe file without ``act``: spectra and metrics of every site and the weights, float64."""
    per_head = 2 * cfg.head_dim + 4 + 2 + n_sequences  # sv, eig_cov; four metrics; pr_seq, n; pr_seq_each
    sites = 3 + 1  # proj, normed, roped; weight
    return cfg.n_layers * (cfg.n_heads + cfg.n_kv_heads) * sites * per_head * 8 + cfg.n_layers * 2 * cfg.head_dim * 8


def cell_plan(settings: dict, mfu: float = DEFAULT_MFU, packed_ratio: float = PACKED_STATE_RATIO) -> dict:
    """Compute and disk of one cell (bytes, hours)."""
    train, optimizer = settings["train"], settings["cell"]["optimizer"]
    sizes = _sizes(settings["model"], optimizer)
    n, hidden = sizes["n_params"], sizes["n_hidden"]
    snapshot = 4 * n
    optimizer_state = 4 * hidden + 8 * (n - hidden) if optimizer == "muon" else 8 * n
    resume = round(packed_ratio * (4 * n + optimizer_state))
    marks = qconfig.checkpoint_tokens(settings)
    kept = qconfig.kept_snapshot_tokens(settings)
    probes = len(marks) * probe_file_bytes(sizes["cfg"], settings["probe"]["n_sequences"])
    if train["keep_snapshots"] == "all":
        # at the last snapshot point but one: the newest state written before the oldest is pruned; at the end
        # the final snapshot and no new state
        states = train["keep_resume_checkpoints"]
        peak = max((states + 1) * resume + (len(marks) - 1) * snapshot, states * resume + len(marks) * snapshot)
        peak_snapshots = len(marks)
    elif len(marks) > 1:
        # a segment's end: two state files (each its snapshot with the resume state) and the kept weights so
        # far, unless the first segment's state is the only one before the end; the cell's end: the state it
        # started from and every kept snapshot
        middle = 2 * resume + (len(kept) - 1) * snapshot if len(marks) > 2 else 0
        peak = max(middle, resume + len(kept) * snapshot)
        peak_snapshots = min(len(marks), len(kept) - 1 + 2)
    else:
        peak, peak_snapshots = len(kept) * snapshot, len(kept)
    peak += probes
    return {"scale": settings["cell"]["scale"], "optimizer": optimizer, "n_params": n,
            "tokens": train["total_tokens"], "gpu_hours": gpu_hours(n, train["total_tokens"], mfu),
            "snapshots": len(marks), "kept": len(kept), "snapshot_bytes": snapshot, "resume_bytes": resume,
            "peak_bytes": peak, "final_bytes": len(kept) * snapshot + probes,
            "peak_snapshot_bytes": peak_snapshots * snapshot, "final_snapshot_bytes": len(kept) * snapshot,
            "keep_all_bytes": len(marks) * snapshot + probes}


def study_rows(config: dict, mfu: float = DEFAULT_MFU, packed_ratio: float = PACKED_STATE_RATIO) -> list[dict]:
    """Cells grouped by everything the plan depends on: how many, and their hours and bytes each and together."""
    groups: dict[str, dict] = {}
    for cell in qconfig.cells(config):
        settings = qconfig.cell_settings(config, cell)
        if qconfig.is_hf_scale(settings):  # a public suite: nothing to train (probe cost: public_suites.yaml header)
            continue
        plan = cell_plan(settings, mfu, packed_ratio)
        key = json.dumps(plan, sort_keys=True)
        groups.setdefault(key, {**plan, "cells": 0})["cells"] += 1
    rows = []
    for row in groups.values():
        row["gpu_hours_per_cell"] = row["gpu_hours"]
        row["gpu_hours"] = row["gpu_hours_per_cell"] * row["cells"]
        rows.append(row)
    return rows


def study_totals(rows: list[dict]) -> dict:
    """GPU-hours, final disk, and peak disk with all cells at once or one at a time."""
    final = sum(r["final_bytes"] * r["cells"] for r in rows)
    return {"gpu_hours": sum(r["gpu_hours"] for r in rows), "cells": sum(r["cells"] for r in rows),
            "final_bytes": final,
            "peak_all_at_once_bytes": sum(r["peak_bytes"] * r["cells"] for r in rows),
            # the last cell to run is the one whose peak rises most above its final footprint
            "peak_one_at_a_time_bytes": final + max(r["peak_bytes"] - r["final_bytes"] for r in rows),
            "keep_all_bytes": sum(r["keep_all_bytes"] * r["cells"] for r in rows),
            "snapshots_all_at_once_bytes": sum(r["peak_snapshot_bytes"] * r["cells"] for r in rows),
            "snapshots_one_at_a_time_bytes": sum(r["final_snapshot_bytes"] * r["cells"] for r in rows)
            + max(r["peak_snapshot_bytes"] - r["final_snapshot_bytes"] for r in rows)}


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.1f}" if n_bytes < 1e11 else f"{n_bytes / 1e9:,.0f}"


def markdown_table(rows: list[dict], mfu: float, packed_ratio: float = PACKED_STATE_RATIO) -> str:
    lines = ["| scale | optimizer | parameters N | tokens D per cell | cells | GPU-h per cell | GPU-h total | "
             "snapshots (kept) | snapshot GB | resume state GB (packed) | peak GB per cell | final GB per cell |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scale']} | {r['optimizer']} | {r['n_params'] / 1e6:,.1f}M | {r['tokens'] / 1e6:,.1f}M | "
                     f"{r['cells']} | {r['gpu_hours_per_cell']:.3g} | {r['gpu_hours']:.3g} | "
                     f"{r['snapshots']} ({r['kept']}) | {_gb(r['snapshot_bytes'])} | {_gb(r['resume_bytes'])} | "
                     f"{_gb(r['peak_bytes'])} | {_gb(r['final_bytes'])} |")
    t = study_totals(rows)
    lines.append(f"| **all** | | | | {t['cells']} | | **{t['gpu_hours']:.3g}** | | | | | |")
    lines.append(f"\n6·N·D at {mfu:.0%} MFU of an H100's {H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s (bf16, dense). "
                 f"Disk of the study (GB): peak {_gb(t['peak_all_at_once_bytes'])} with every cell training at "
                 f"once, {_gb(t['peak_one_at_a_time_bytes'])} one cell at a time, with resume states packed to "
                 f"{packed_ratio:.2f} of their size; final "
                 f"{_gb(t['final_bytes'])}; keeping every snapshot would take {_gb(t['keep_all_bytes'])}. "
                 f"Weights alone (snapshots without optimizer state): peak "
                 f"{_gb(t['snapshots_all_at_once_bytes'])} at once, "
                 f"{_gb(t['snapshots_one_at_a_time_bytes'])} one cell at a time.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Plan a study: training GPU-hours (6·N·D at a stated MFU), "
                                                 "peak and final disk, per kind of cell and in all.")
    parser.add_argument("configs", nargs="+", help="study config YAML files")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation, 0..1")
    parser.add_argument("--packed-ratio", type=float, default=PACKED_STATE_RATIO,
                        help="packed ÷ plain size of a resume state (1 for the worst case: nothing compresses)")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu {args.mfu}: give a fraction in (0, 1]")
    if not 0 < args.packed_ratio <= 1:
        parser.error(f"--packed-ratio {args.packed_ratio}: give a fraction in (0, 1]")
    for path in args.configs:
        rows = study_rows(qconfig.load(path), args.mfu, args.packed_ratio)
        plan = markdown_table(rows, args.mfu, args.packed_ratio) if rows else \
            "No cell to train (public checkpoint suites only)."
        print(f"### {path}\n\n{plan}\n")


if __name__ == "__main__":
    main()
