"""The GEMM roofline of a training step: the step's own model-FLOP matrix products, each timed alone at its shape.

MFU against the square-matrix peak says how far a step is from the hardware's best case; it does not say
whether that best case is reachable at the step's shapes. Timed one by one, in the step's dtype, the GEMMs
that make up the FLOPs formula (every Linear forward, input gradient and weight gradient; QKᵀ and A·V and
their four gradients over the whole T×T square, as the formula counts them) sum to the time the step would
take if everything else (softmax, norms, casts, the optimizer) were free: ``mfu_ceiling`` is its MFU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from qkrank.bench.core import best_seconds
from qkrank.model import ModelConfig


@dataclass(frozen=True)
class Gemm:
    """``count`` products of ``batch`` × (m × k) @ (k × n); an operand marked transposed is a transposed view,
    as autograd passes it (``x @ Wᵀ`` forward, ``dYᵀ @ x`` for a weight gradient)."""

    name: str
    batch: int
    m: int
    k: int
    n: int
    count: int
    a_transposed: bool = False
    b_transposed: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n * self.count

    @property
    def shape(self) -> tuple:
        return self.batch, self.m, self.k, self.n, self.a_transposed, self.b_transposed


def _linear(name: str, tokens: int, d_in: int, d_out: int, count: int) -> list[Gemm]:
    return [Gemm(f"{name} forward", 1, tokens, d_in, d_out, count, b_transposed=True),
            Gemm(f"{name} input gradient", 1, tokens, d_out, d_in, count),
            Gemm(f"{name} weight gradient", 1, d_out, tokens, d_in, count, a_transposed=True)]


def step_gemms(cfg: ModelConfig, micro_batch: int, seq_len: int, grad_accum: int = 1) -> list[Gemm]:
    """The model-FLOP GEMMs of one optimizer step; their FLOPs are model_flops_per_token's total × tokens."""
    tokens, layer_passes = micro_batch * seq_len, cfg.n_layers * grad_accum
    d, kv, ff, hd = cfg.d_model, cfg.kv_dim, cfg.d_ff, cfg.head_dim
    gemms = [*_linear("q_proj", tokens, d, d, layer_passes), *_linear("k_proj", tokens, d, kv, layer_passes),
             *_linear("v_proj", tokens, d, kv, layer_passes), *_linear("o_proj", tokens, d, d, layer_passes),
             *_linear("mlp.up", tokens, d, ff, layer_passes), *_linear("mlp.down", tokens, ff, d, layer_passes),
             *_linear("lm_head", tokens, d, cfg.vocab_size, grad_accum)]
    heads = micro_batch * cfg.n_heads  # every query head; a shared K/V head's gradient sums its group's
    T = seq_len
    gemms += [Gemm("attention QKᵀ forward", heads, T, hd, T, layer_passes, b_transposed=True),
              Gemm("attention A·V forward", heads, T, T, hd, layer_passes),
              Gemm("attention dA = dO·Vᵀ", heads, T, hd, T, layer_passes, b_transposed=True),
              Gemm("attention dV = Aᵀ·dO", heads, T, T, hd, layer_passes, a_transposed=True),
              Gemm("attention dQ = dS·K", heads, T, T, hd, layer_passes),
              Gemm("attention dKᵀ = Qᵀ·dS", heads, hd, T, T, layer_passes, a_transposed=True)]
    return gemms


def _operands(g: Gemm, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """Random operands made on ``device`` (``gen`` is a generator there): a GPU's head GEMMs are GBs."""
    a_shape = (g.batch, g.k, g.m) if g.a_transposed else (g.batch, g.m, g.k)
    b_shape = (g.batch, g.n, g.k) if g.b_transposed else (g.batch, g.k, g.n)
    a = torch.empty(a_shape, device=device, dtype=dtype).normal_(generator=gen)
    b = torch.empty(b_shape, device=device, dtype=dtype).normal_(generator=gen)
    a, b = (a.transpose(1, 2) if g.a_transposed else a), (b.transpose(1, 2) if g.b_transposed else b)
    if g.batch == 1:  # a 2-D product, as a Linear layer's is (mm, not bmm)
        a, b = a[0], b[0]
    return a, b


def time_gemm(g: Gemm, dtype: torch.dtype, device: torch.device, round_s: float = 0.02, rounds: int = 3) -> float:
    """Best seconds of one product of ``g``'s shape: ``rounds`` rounds of as many products as fill ``round_s``."""
    a, b = _operands(g, dtype, device, torch.Generator(device=device).manual_seed(0))
    out = torch.matmul(a, b)

    def product():
        torch.matmul(a, b, out=out)

    once = best_seconds(product, device, repeats=1, rounds=1)
    return best_seconds(product, device, repeats=max(1, min(1000, int(round_s / max(once, 1e-7)))), rounds=rounds)


def gemm_roofline(cfg: ModelConfig, micro_batch: int, seq_len: int, dtype: torch.dtype, device: torch.device,
                  peak_flops: float | None, grad_accum: int = 1, round_s: float = 0.02) -> dict:
    """Seconds of the step's GEMMs timed alone (each distinct shape once), the FLOP/s that makes, and the MFU
    ceiling: that rate over ``peak_flops`` (None without a peak). ``gemms`` lists each product with its time."""
    gemms = step_gemms(cfg, micro_batch, seq_len, grad_accum)
    seconds: dict[tuple, float] = {}
    for g in gemms:
        if g.shape not in seconds:
            seconds[g.shape] = time_gemm(g, dtype, device, round_s=round_s)
    gemm_s = sum(seconds[g.shape] * g.count for g in gemms)
    flops = sum(g.flops for g in gemms)
    rows = [{**asdict(g), "flops": g.flops, "seconds": seconds[g.shape] * g.count,
             "flops_per_s": g.flops / (seconds[g.shape] * g.count)} for g in gemms]
    return {"dtype": str(dtype).removeprefix("torch."), "gemm_s": gemm_s, "model_flops": flops,
            "gemm_flops_per_s": flops / gemm_s, "mfu_ceiling": flops / gemm_s / peak_flops if peak_flops else None,
            "distinct_shapes": len(seconds), "gemms": rows}
