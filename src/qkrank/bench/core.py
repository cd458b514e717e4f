"""FLOPs per token, measured matmul peaks per dtype, the goals of the suite; shared by every benchmark kind."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from qkrank.model import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[3]
SRC_DIR = Path(__file__).resolve().parents[2]
FLOPS_FORMULA = ("model FLOPs per token = 6·N + 12·n_layers·d_model·seq_len; N = weights of every Linear layer "
                 "(attention, MLP, output head); 12·L·d·T counts QKᵀ and A·V forward+backward without the "
                 "causal half (PaLM appendix B)")
GOALS = {"cpu_mfu": 0.5, "speedup_over_naive": 1.5, "probe_cost_ratio": 0.05, "dry_run_s": 10.0,
         "gpu_mfu_1.5b": 0.5}


def matmul_params(model: nn.Module) -> int:
    """N of the FLOPs formula: elements of every Linear weight, each shared tensor once."""
    seen = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(seen.values())


def model_flops_per_token(cfg: ModelConfig, n_matmul: int, seq_len: int) -> dict:
    """{"dense": 6·N, "attention": 12·n_layers·d_model·seq_len, "total": their sum} FLOPs per trained token."""
    dense, attention = 6 * n_matmul, 12 * cfg.n_layers * cfg.d_model * seq_len
    return {"dense": dense, "attention": attention, "total": dense + attention}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device: torch.device, repeats: int, rounds: int = 3) -> float:
    """Best seconds per call of ``fn`` over ``rounds`` rounds of ``repeats`` calls (on a shared machine the
    fastest round is the least disturbed one)."""
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        _synchronize(device)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int, rounds: int = 3) -> float:
    """Best FLOP/s of an n×n by n×n product (2·n³ FLOPs) over ``rounds`` rounds of ``repeats`` products."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)
    _synchronize(device)
    return 2 * n**3 / best_seconds(lambda: torch.matmul(a, b, out=out), device, repeats, rounds)
