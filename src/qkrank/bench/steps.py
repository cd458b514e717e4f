"""What is timed: a train step as qkrank.train takes it, and the naive-attention copy of the model."""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time

import torch
import torch.nn as nn

from qkrank.bench.core import _synchronize
from qkrank.model import GPT, CausalSelfAttention, apply_rope
from qkrank.optim import build_optimizers
from qkrank.settings import AdamWSettings, MuonSettings, OptimSettings, ScheduleSettings

# Optimizer settings of the speed runs; step time does not depend on these values.
BENCH_OPTIM = OptimSettings(
    muon=MuonSettings(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, adjust_lr_fn=None, weight_decay=0.0),
    adamw=AdamWSettings(lr=0.003, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0),
    schedule=ScheduleSettings(warmup_tokens=0, decay="constant", min_lr_ratio=1.0))


class NaiveAttention(CausalSelfAttention):
    """The same attention, computed the textbook way: K/V repeated per query group, explicit masked softmax."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hd, groups = self.cfg.head_dim, self.cfg.n_heads // self.cfg.n_kv_heads
        q = self.q_proj(x).view(B, T, self.cfg.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        y = weights @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.cfg.d_model))


def naive_copy(model: GPT) -> GPT:
    """A deep copy of ``model`` (same weights) whose attention layers are NaiveAttention."""
    naive = copy.deepcopy(model)
    for block in naive.blocks:
        block.attn.__class__ = NaiveAttention
    return naive


# ---------------------------------------------------------------- timing train steps

def train_step(model: nn.Module, optimizers: dict, batches: torch.Tensor, autocast, clip: float = 1.0,
               fused_loss: bool = False) -> float:
    """One optimizer step as qkrank.train takes it: accumulated forward/backward, clip, step, zero_grad."""
    accum = len(batches)
    loss_sum = 0.0
    for batch in batches:
        with autocast():
            _, loss = model(batch[:, :-1], batch[:, 1:], fused_loss=fused_loss)
        (loss / accum).backward()
        loss_sum += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    for opt in optimizers.values():
        opt.step()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    return float(loss_sum) / accum


def random_batches(vocab: int, grad_accum: int, micro_batch: int, seq_len: int, device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (grad_accum, micro_batch, seq_len + 1), generator=gen).to(device)


class StepTimer:
    """Times train steps of one model with its own optimizers; ``autocast`` is a context factory, ``fused``
    the train.fused switch (fused AdamW, chunked head loss)."""

    def __init__(self, model: nn.Module, batches: torch.Tensor, device: torch.device, autocast=None,
                 optimizer: str = "muon", fused: bool = False):
        self.model, self.batches, self.device, self.fused = model, batches, device, fused
        self.autocast = autocast or contextlib.nullcontext
        self.optimizers = build_optimizers(model, optimizer, BENCH_OPTIM, fused=fused)
        self.seconds: list[float] = []

    def step(self, record: bool = True) -> None:
        _synchronize(self.device)
        t0 = time.perf_counter()
        loss = train_step(self.model, self.optimizers, self.batches, self.autocast, fused_loss=self.fused)
        _synchronize(self.device)
        if not math.isfinite(loss):
            raise RuntimeError(f"benchmark step produced a non-finite loss ({loss})")
        if record:
            self.seconds.append(time.perf_counter() - t0)

    def summary(self, tokens_per_step: int, flops_per_token: float, peak: float | None,
                statistic: str = "median") -> dict:
        """Rates from the median step (steady GPUs) or the best step (shared CPUs, like the matmul peak)."""
        step_s = min(self.seconds) if statistic == "best" else statistics.median(self.seconds)
        tokens_per_s = tokens_per_step / step_s
        out = {"step_s": step_s, "step_statistic": statistic, "step_s_median": statistics.median(self.seconds),
               "step_s_all": self.seconds, "tokens_per_s": tokens_per_s,
               "model_flops_per_s": tokens_per_s * flops_per_token}
        if peak:
            out["mfu"] = out["model_flops_per_s"] / peak
        return out
