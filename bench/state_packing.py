#!/usr/bin/env python3
"""How much lossless packing (qkrank.state_packing) shrinks real training states: the ratio the planner uses.

    python bench/state_packing.py [--config configs/seed000_88m.yaml] [--steps 8] [--seq-len 256] [--batch 4]
    python bench/state_packing.py --state results/runs/tiny/learned/muon/seed0/snapshots/temp/393216.pt

Builds the first cell of the config (model and optimizers as training builds them), takes ``--steps`` optimizer
steps on random tokens, and prints packed ÷ plain ``torch.save`` bytes for the weights, each optimizer's state
and the whole resume state, with the time packing took. ``--state`` measures a state file a run wrote instead.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import torch

from qkrank import checkpoint, state_packing
from qkrank import config as qconfig
from qkrank.optim import build_optimizers
from qkrank.settings import CellSettings
from qkrank.train import build_model


def saved_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def trained_state(config: Path, steps: int, seq_len: int, batch: int) -> dict:
    cfg = qconfig.load(config)
    settings = CellSettings.of(qconfig.cell_settings(cfg, qconfig.cells(cfg)[0]))
    torch.manual_seed(0)
    model = build_model(settings)
    optimizers = build_optimizers(model, settings.cell.optimizer, settings.optim)
    vocab = model.cfg.vocab_size
    for _ in range(steps):
        tokens = torch.randint(vocab, (batch, seq_len + 1))
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"model": model.state_dict(), "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/seed000_88m.yaml"))
    parser.add_argument("--state", type=Path, help="a resume or segment state file to measure instead")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    if args.state:
        state = checkpoint.read_state(args.state)
        source = str(args.state)
    else:
        state = trained_state(args.config, args.steps, args.seq_len, args.batch)
        source = f"{args.config} (first cell) after {args.steps} steps on random tokens"
    print(f"# {source}\n\n| part | plain MB | packed MB | packed ÷ plain | pack s |\n|---|---:|---:|---:|---:|")
    parts = {"weights": state["model"], **{f"{k} state": v for k, v in state["optimizers"].items()},
             "whole state": {"model": state["model"], "optimizers": state["optimizers"]}}
    for name, part in parts.items():
        start = time.perf_counter()
        packed = state_packing.pack(part)
        seconds = time.perf_counter() - start
        plain, small = saved_bytes(part), saved_bytes(packed)
        print(f"| {name} | {plain / 1e6:.1f} | {small / 1e6:.1f} | {small / plain:.3f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
