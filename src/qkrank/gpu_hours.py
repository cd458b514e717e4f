"""Estimated GPU-hours of a study's training: FLOPs ≈ 6·N·D at a stated share (MFU) of a GPU's peak.

``python -m qkrank.gpu_hours configs/seed004_1p5b.yaml [--mfu 0.4]`` prints a Markdown table, one row per
scale (and token budget), with the cells of the grid, GPU-hours per cell and for all of them.
N counts every parameter once (the tied embedding stands for the output projection's matmul); attention's
own FLOPs (12·layers·d_model·seq_len per token) and the probes are left out.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from qkrank import config as qconfig

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM, bf16 tensor cores without sparsity
DEFAULT_MFU = 0.40


def training_flops(n_params: int, tokens: int) -> float:
    """C = 6·N·D: forward (2·N) plus backward (4·N) FLOPs per token."""
    return 6.0 * n_params * tokens


def gpu_hours(n_params: int, tokens: int, mfu: float = DEFAULT_MFU, peak_flops: float = H100_BF16_DENSE_FLOPS) -> float:
    """Hours on one GPU: 6·N·D / (MFU · peak FLOP/s) / 3600."""
    return training_flops(n_params, tokens) / (mfu * peak_flops) / 3600.0


def study_rows(config: dict, mfu: float = DEFAULT_MFU) -> list[dict]:
    """Cells grouped by (scale, parameters, tokens): how many, and their GPU-hours each and together."""
    from qkrank.model import ModelConfig, model_summary

    groups: dict[tuple, int] = defaultdict(int)
    n_params_of: dict[str, int] = {}
    for cell in qconfig.cells(config):
        settings = qconfig.cell_settings(config, cell)
        model = settings["model"]
        if "hf" in model:  # a public suite: nothing to train (its probe cost: configs/public_suites.yaml header)
            continue
        key = json.dumps(model, sort_keys=True)
        if key not in n_params_of:
            fields = {k: v for k, v in model.items() if k != "preset"}
            n_params_of[key] = model_summary(ModelConfig.from_preset(model["preset"], **fields))["n_params"]
        groups[(cell.scale, n_params_of[key], settings["train"]["total_tokens"])] += 1
    rows = []
    for (scale, n_params, tokens), n_cells in groups.items():
        per_cell = gpu_hours(n_params, tokens, mfu)
        rows.append({"scale": scale, "n_params": n_params, "tokens": tokens, "cells": n_cells,
                     "gpu_hours_per_cell": per_cell, "gpu_hours": per_cell * n_cells})
    return rows


def markdown_table(rows: list[dict], mfu: float) -> str:
    lines = ["| scale | parameters N | tokens D per cell | cells | GPU-h per cell | GPU-h total |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scale']} | {r['n_params'] / 1e6:,.1f}M | {r['tokens'] / 1e6:,.1f}M | {r['cells']} | "
                     f"{r['gpu_hours_per_cell']:.3g} | {r['gpu_hours']:.3g} |")
    total = sum(r["gpu_hours"] for r in rows)
    lines.append(f"| **all** | | | {sum(r['cells'] for r in rows)} | | **{total:.3g}** |")
    lines.append(f"\n6·N·D at {mfu:.0%} MFU of an H100's {H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s (bf16, dense).")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Estimate a study's training GPU-hours (6·N·D at a stated MFU).")
    parser.add_argument("configs", nargs="+", help="study config YAML files")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation, 0..1")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu {args.mfu}: give a fraction in (0, 1]")
    for path in args.configs:
        print(f"### {path}\n\n{markdown_table(study_rows(qconfig.load(path), args.mfu), args.mfu)}\n")


if __name__ == "__main__":
    main()
