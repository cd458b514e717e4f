"""CPU training efficiency: tokens/s of the tiny preset's train step, MFU against each dtype's matmul peak."""

from __future__ import annotations

import copy

import torch

from qkrank import runtime
from qkrank.bench.core import FLOPS_FORMULA, GOALS, matmul_params, matmul_peak, model_flops_per_token
from qkrank.bench.roofline import gemm_roofline
from qkrank.bench.steps import StepTimer, naive_copy, random_batches
from qkrank.model import GPT, ModelConfig


def _bf16_autocast():
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def training_efficiency(threads: int, quick: bool) -> dict:
    """tiny preset, micro-batch 16 × seq 256 (4 × 128 quick): tokens/s in fp32 and (where the CPU has native
    bf16) bf16 autocast, MFU against each dtype's matmul peak, speed-up over naive attention.

    ``real`` is the precision qkrank.train picks with ``bf16: auto`` on this machine; its ``mfu`` is against
    that precision's peak, ``mfu_vs_fp32_peak`` against the fp32 peak for comparison. ``gemm_roofline`` times
    the step's own GEMMs alone in each dtype (qkrank.bench.roofline): ``of_gemm_roofline`` is their time over the
    step's, and the roofline's ``mfu_ceiling`` the MFU the step would reach if nothing but its GEMMs took time.
    """
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    micro_batch, seq_len = (4, 128) if quick else (16, 256)
    steps, warmup, matmul_n = (2, 1, 512) if quick else (8, 2, 1024)
    bf16 = runtime.resolve_switch("auto", runtime.cpu_has_native_bf16())
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if bf16 else {})}
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny"))
    batches = random_batches(model.cfg.vocab_size, 1, micro_batch, seq_len, device)
    flops = model_flops_per_token(model.cfg, matmul_params(model), seq_len)
    # Each timer trains its own copy of the same initial weights with its own optimizers.
    timers = {"fp32": StepTimer(copy.deepcopy(model), batches, device)}
    if bf16:
        timers["bf16"] = StepTimer(copy.deepcopy(model), batches, device, _bf16_autocast)
    used = "bf16" if bf16 else "fp32"
    timers["naive"] = StepTimer(naive_copy(model), batches, device, timers[used].autocast)
    repeats = 2 if quick else 5
    peak_runs = {name: [matmul_peak(device, dt, matmul_n, repeats=repeats)] for name, dt in dtypes.items()}
    for i in range(warmup + steps):  # interleaved, so drift of the machine's speed hits all alike
        for timer in timers.values():
            timer.step(record=i >= warmup)
    for name, dt in dtypes.items():
        peak_runs[name].append(matmul_peak(device, dt, matmul_n, repeats=repeats))
    peaks = {name: max(runs) for name, runs in peak_runs.items()}
    rooflines = {name: gemm_roofline(model.cfg, micro_batch, seq_len, dt, device, peaks[name],
                                     round_s=0.005 if quick else 0.02) for name, dt in dtypes.items()}
    tokens = micro_batch * seq_len
    runs = {name: timers[name].summary(tokens, flops["total"], peaks[name], statistic="best") for name in dtypes}
    for name, run in runs.items():
        run["mfu_vs_fp32_peak"] = run["model_flops_per_s"] / peaks["fp32"]
        run["of_gemm_roofline"] = rooflines[name]["gemm_s"] / run["step_s"]
    naive = timers["naive"].summary(tokens, flops["total"], peaks[used], statistic="best")
    out = {
        "preset": "tiny", "threads": threads, "micro_batch": micro_batch, "grad_accum": 1, "seq_len": seq_len,
        "optimizer": "muon (hidden matrices) + adamw", "timed_steps": steps, "warmup_steps": warmup,
        "n_params": model.num_params(), "matmul_params": matmul_params(model),
        "flops_formula": FLOPS_FORMULA, "flops_per_token": flops, "matmul_n": matmul_n,
        "cpu_native_bf16": runtime.cpu_has_native_bf16(), "training_precision": used,
        "matmul_peak_flops": peaks, "matmul_peak_runs": peak_runs,
        "fp32_matmul_peak_flops": peaks["fp32"], "gemm_roofline": rooflines, **runs,
        "real": runs[used], "naive": naive,
        "speedup_over_naive": naive["step_s"] / runs[used]["step_s"],
        "goals": {"mfu": GOALS["cpu_mfu"], "speedup_over_naive": GOALS["speedup_over_naive"]},
    }
    if bf16:
        out["bf16_over_fp32_tokens_per_s"] = runs["bf16"]["tokens_per_s"] / runs["fp32"]["tokens_per_s"]
        out["bf16_over_fp32_matmul_peak"] = peaks["bf16"] / peaks["fp32"]
    return out
