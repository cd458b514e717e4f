"""GPU training (CUDA only): step time, tokens/s and MFU against the dense bf16 datasheet peak for 88m and 1.5b."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from qkrank.bench.core import FLOPS_FORMULA, _synchronize, matmul_params, matmul_peak, model_flops_per_token
from qkrank.bench.roofline import gemm_roofline
from qkrank.bench.steps import StepTimer, random_batches
from qkrank.model import GPT, ModelConfig

# Dense bf16 tensor-core peaks without sparsity (vendor datasheets), matched against the device name in order.
GPU_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0),
)
PEAK_ENV = "QKRANK_GPU_PEAK_TFLOPS"
# The seed-004 GPU shapes: micro-batch × accumulation × sequence = 65,536 tokens per optimizer step.
GPU_RUNS = {
    "88m": {"micro_batch": 16, "grad_accum": 4, "seq_len": 1024},  # the preset's context is 1024
    "1.5b": {"micro_batch": 8, "grad_accum": 4, "seq_len": 2048},
}


def gpu_shape(preset: str, micro_batch: int | None = None) -> dict:
    """The run shape of ``preset`` (GPU_RUNS); a ``micro_batch`` replaces its micro-batch, and accumulation
    changes so that an optimizer step keeps its tokens."""
    shape = dict(GPU_RUNS[preset])
    if micro_batch is None:
        return shape
    tokens = shape["micro_batch"] * shape["grad_accum"] * shape["seq_len"]
    if micro_batch < 1 or tokens % (micro_batch * shape["seq_len"]):
        raise ValueError(f"--gpu-micro-batch {micro_batch}: {preset}'s step of {tokens:,} tokens at sequence "
                         f"length {shape['seq_len']} needs a micro-batch dividing {tokens // shape['seq_len']}")
    return {**shape, "micro_batch": micro_batch, "grad_accum": tokens // (micro_batch * shape["seq_len"])}


def gpu_spec_peak(device_name: str) -> tuple[float | None, str]:
    """Dense bf16 peak FLOP/s of a GPU and where it came from: $QKRANK_GPU_PEAK_TFLOPS, else the name table."""
    override = os.environ.get(PEAK_ENV)
    if override:
        return float(override) * 1e12, f"${PEAK_ENV}"
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12, f"datasheet ({key})"
    return None, f"unknown device {device_name!r}: set ${PEAK_ENV}"


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _autocast_factory(device: torch.device, bf16: bool):
    if bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _measure_attempt(cfg: ModelConfig, device: torch.device, micro_batch: int, grad_accum: int, seq_len: int,
                     steps: int, warmup: int, bf16: bool, compile_model: bool) -> dict:
    """Build, (optionally) compile and time one shape; raises torch.OutOfMemoryError if it does not fit."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    compile_note = "off"
    if compile_model:
        try:
            for block in model.blocks:  # regional compilation: one compiled block reused by all layers
                block.compile()
            compile_note = "regional (each Block)"
        except Exception as e:  # noqa: BLE001 — any compile failure falls back to eager, reported
            compile_note = f"failed ({type(e).__name__}: {e}); eager"
    batches = random_batches(cfg.vocab_size, grad_accum, micro_batch, seq_len, device)
    # train.fused: auto is on with CUDA: fused AdamW and the chunked head loss, as training takes them.
    timer = StepTimer(model, batches, device, _autocast_factory(device, bf16), fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    compile_error = None
    try:
        timer.step(record=False)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 — a compiled step that fails at run time falls back to eager
        if not compile_model:
            raise
        compile_error = f"{type(e).__name__}: {str(e)[:300]}"
    if compile_error is not None:  # outside the except block, so the failed step's tensors can be freed
        print(f"qkrank.bench: torch.compile failed at the first step ({compile_error}); measuring eager instead",
              file=sys.stderr, flush=True)
        del timer, model, batches
        _free_memory(device)
        result = _measure_attempt(cfg, device, micro_batch, grad_accum, seq_len, steps, warmup, bf16, False)
        result["compile"] = f"failed ({compile_error}); eager"
        return result
    first_step_s = time.perf_counter() - t0
    for i in range(warmup - 1 + steps):
        timer.step(record=i >= warmup - 1)
    out = {"compile": compile_note, "fused": timer.fused, "first_step_s": first_step_s, "seconds": timer.seconds,
           "n_params": model.num_params(), "matmul_params": matmul_params(model)}
    if device.type == "cuda":
        out["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    out["timer"] = timer
    return out


def gpu_training(preset: str, device: str | torch.device = "cuda", micro_batch: int = 8, grad_accum: int = 4,
                 seq_len: int = 2048, steps: int = 10, warmup: int = 2, bf16: bool = True,
                 compile_model: bool = True, peak_flops: float | None = None, overrides: dict | None = None) -> dict:
    """Step time, tokens/s and MFU of ``preset``; on out-of-memory the micro-batch halves and accumulation
    doubles (same tokens per step) until it fits, and every attempt is reported."""
    device = torch.device(device)
    cfg = ModelConfig.from_preset(preset, **(overrides or {}))
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds preset {preset!r}'s max_seq_len {cfg.max_seq_len}")
    tokens_per_step = micro_batch * grad_accum * seq_len
    attempts, mb, accum = [], micro_batch, grad_accum
    while True:
        error = None
        try:
            result = _measure_attempt(cfg, device, mb, accum, seq_len, steps, warmup, bf16, compile_model)
        except torch.OutOfMemoryError as e:
            error = str(e)[:300]
        if error is None:
            attempts.append({"micro_batch": mb, "grad_accum": accum, "fits": True})
            break
        attempts.append({"micro_batch": mb, "grad_accum": accum, "fits": False, "error": error})
        _free_memory(device)  # outside the except block: its traceback no longer holds the failed step
        if mb == 1:
            return {"preset": preset, "device": str(device), "attempts": attempts,
                    "skipped": "out of memory even at micro-batch 1"}
        print(f"qkrank.bench: {preset} micro-batch {mb} × accumulation {accum} is out of memory; "
              f"trying {mb // 2} × {accum * 2}", file=sys.stderr, flush=True)
        mb, accum = mb // 2, accum * 2
    timer = result.pop("timer")
    del timer.model, timer.optimizers, timer.batches  # the roofline's operands need the memory
    _free_memory(device)
    flops = model_flops_per_token(cfg, result["matmul_params"], seq_len)
    summary = timer.summary(tokens_per_step, flops["total"], peak_flops)
    try:
        roofline = gemm_roofline(cfg, mb, seq_len, torch.bfloat16 if bf16 else torch.float32, device, peak_flops,
                                 grad_accum=accum)
        summary["of_gemm_roofline"] = roofline["gemm_s"] / summary["step_s"]
    except torch.OutOfMemoryError as e:  # the roofline is an aside: the step's figures stand without it
        roofline = {"skipped": f"out of memory: {str(e)[:200]}"}
        _free_memory(device)
    return {"preset": preset, "device": str(device), "micro_batch": mb, "grad_accum": accum, "seq_len": seq_len,
            "tokens_per_step": tokens_per_step, "bf16": bf16, "attempts": attempts, "timed_steps": steps,
            "flops_formula": FLOPS_FORMULA, "flops_per_token": flops, "peak_flops": peak_flops,
            **{k: v for k, v in result.items() if k != "seconds"}, **summary, "gemm_roofline": roofline}


def sdpa_gqa_check(device: torch.device, n_heads: int = 16, n_kv_heads: int = 8, seq_len: int = 2048,
                   head_dim: int = 128, batch: int = 4) -> dict:
    """Which fused SDPA kernels accept the model's grouped K/V (enable_gqa), and forward+backward time of the
    default dispatch against K/V repeated per group first: the attention cost behind the MFU figures."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cpu").manual_seed(0)

    def tensor(heads):
        return torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(device, torch.bfloat16).requires_grad_()

    q, k, v = tensor(n_heads), tensor(n_kv_heads), tensor(n_kv_heads)
    groups = n_heads // n_kv_heads
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            # torch warns once per refusing kernel; the refusal is recorded below instead
            with sdpa_kernel(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
            out[backend.name] = "accepts enable_gqa"
        except RuntimeError as e:
            out[backend.name] = f"refuses: {str(e).splitlines()[0][:200]}"

    def timed(fn, repeats=10):
        fn().sum().backward()
        _synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn().sum().backward()
        _synchronize(device)
        return (time.perf_counter() - t0) / repeats

    out["gqa_s"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    out["repeated_kv_s"] = timed(lambda: F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=True))
    out["shape"] = {"batch": batch, "heads": n_heads, "kv_heads": n_kv_heads, "seq_len": seq_len,
                    "head_dim": head_dim}
    return out


def gpu_benchmarks(presets, steps: int, warmup: int, micro_batch: int | None = None) -> dict:
    """The GPU part: bf16 matmul peak measured now, then each preset with bf16 autocast and torch.compile
    (at ``micro_batch`` when given: gpu_shape)."""
    shapes = {preset: gpu_shape(preset, micro_batch) for preset in presets}
    if not torch.cuda.is_available():
        return {"skipped": "CUDA is not available: GPU benchmarks skipped (nothing measured, nothing estimated)"}
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    spec_peak, spec_source = gpu_spec_peak(name)
    measured_peak = matmul_peak(device, torch.bfloat16, 8192, repeats=10)
    out = {"device_name": name, "spec_bf16_peak_flops": spec_peak, "spec_peak_source": spec_source,
           "measured_bf16_matmul_flops": measured_peak, "matmul_n": 8192,
           "total_memory_gb": torch.cuda.get_device_properties(device).total_memory / 1e9,
           "sdpa_gqa": sdpa_gqa_check(device), "runs": {}}
    for preset in presets:
        run = gpu_training(preset, device, steps=steps, warmup=warmup, peak_flops=spec_peak, **shapes[preset])
        if "model_flops_per_s" in run:
            run["mfu_vs_measured_matmul"] = run["model_flops_per_s"] / measured_peak
        out["runs"][preset] = run
        torch.cuda.empty_cache()
    return out
