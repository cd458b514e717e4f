#!/usr/bin/env python3
"""Memory and time of the output head's loss, plain (logits, then F.cross_entropy) against fused
(qkrank.losses.linear_cross_entropy: the ``train.fused`` switch), forward + backward, on this machine's CPU.

    python bench/head_loss.py [--preset 88m] [--tokens 4096] [--threads N] [--repeats 3]

Each variant runs in a fresh process under bf16 autocast where the CPU has native bf16 (as training would):
the peak resident memory it adds (VmHWM reset just before the loss) and the best of ``--repeats`` times.
The head is the preset's (d_model × vocab, tied weights in float32); hidden states are random.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import torch, torch.nn.functional as F
from qkrank import runtime
from qkrank.bench.probe_cost import current_rss_kb, peak_rss_kb, peak_rss_reset
from qkrank.losses import linear_cross_entropy
from qkrank.model import ModelConfig
variant, preset = sys.argv[1], sys.argv[2]
tokens, threads, repeats = (int(a) for a in sys.argv[3:6])
torch.set_num_threads(threads)
cfg = ModelConfig.from_preset(preset)
gen = torch.Generator().manual_seed(0)
weight = (torch.randn(cfg.vocab_size, cfg.d_model, generator=gen) * 0.02).requires_grad_()
hidden = torch.randn(tokens, cfg.d_model, generator=gen).requires_grad_()
targets = torch.randint(0, cfg.vocab_size, (tokens,), generator=gen)
bf16 = runtime.cpu_has_native_bf16()

def step():
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if variant == "fused":
            loss = linear_cross_entropy(hidden, weight, targets)
        else:
            loss = F.cross_entropy((hidden @ weight.t()).float(), targets)
    loss.backward()
    return loss.item()

reset = peak_rss_reset()
start = current_rss_kb()
loss = step()
peak = peak_rss_kb()
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(json.dumps({"variant": variant, "loss": loss, "peak_added_mb": (peak - start) / 1024, "peak_reset": reset,
                  "best_s": min(times), "bf16": bf16}))
"""


def run(variant: str, args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, variant, args.preset, str(args.tokens), str(args.threads),
                          str(args.repeats)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="88m")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    plain, fused = run("plain", args), run("fused", args)
    print(f"head loss, preset {args.preset}, {args.tokens:,} tokens, {args.threads} thread(s), "
          f"bf16 autocast: {plain['bf16']}")
    print("| variant | loss | peak memory added | forward + backward |")
    print("|---|---:|---:|---:|")
    for r in (plain, fused):
        print(f"| {r['variant']} | {r['loss']:.5f} | {r['peak_added_mb']:,.0f} MB | {r['best_s']:.3f} s |")
    print(f"fused ÷ plain: memory {fused['peak_added_mb'] / plain['peak_added_mb']:.3f}, "
          f"time {fused['best_s'] / plain['best_s']:.2f} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
