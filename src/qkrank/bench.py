"""Benchmarks, each a ratio of two things measured side by side in one run (these machines are noisy).

``python -m qkrank.bench [--quick] [--out results/bench] [--gpu-only --preset 1.5b]`` writes JSON files
under ``--out`` and prints a Markdown table. docs/benchmarks.md explains every measurement:

- training: tokens/s of a real train step of the ``tiny`` preset; MFU = model FLOP/s ÷ fp32 square-matmul
  FLOP/s on the same threads; speed-up over a naive-attention copy of the same model.
- probe: probe time ÷ training time of one checkpoint interval; peak RSS of a probe as its tokens double.
- workflow: ``snakemake -n`` wall time of a 2 scales × 3 modes × 5 seeds × 26 checkpoints study; start-up
  cost of one probe job.
- gpu (CUDA only): step time, tokens/s and MFU against the GPU's dense bf16 peak for ``88m`` and ``1.5b``.

Model FLOPs per token (PaLM appendix B): 6·N + 12·n_layers·d_model·seq_len, N = weights of every Linear
layer (the output head included; the embedding lookup and the norm gains do no matmul).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from qkrank.atomic import atomic_write_text
from qkrank.model import GPT, CausalSelfAttention, ModelConfig, apply_rope
from qkrank.optim import build_optimizers

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC_DIR = Path(__file__).resolve().parents[1]
FLOPS_FORMULA = ("model FLOPs per token = 6·N + 12·n_layers·d_model·seq_len; N = weights of every Linear layer "
                 "(attention, MLP, output head); 12·L·d·T counts QKᵀ and A·V forward+backward without the "
                 "causal half (PaLM appendix B)")
# Dense bf16 tensor-core peaks without sparsity (vendor datasheets), matched against the device name in order.
GPU_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0),
)
PEAK_ENV = "QKRANK_GPU_PEAK_TFLOPS"
# Optimizer settings of the speed runs; step time does not depend on these values.
BENCH_OPTIM = {
    "muon": {"lr": 0.02, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr_fn": None,
             "weight_decay": 0.0},
    "adamw": {"lr": 0.003, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0},
}
GOALS = {"cpu_mfu": 0.5, "speedup_over_naive": 1.5, "probe_cost_ratio": 0.05, "dry_run_s": 10.0,
         "gpu_mfu_1.5b": 0.5}
# The seed-004 GPU shapes: micro-batch × accumulation × sequence = 65,536 tokens per optimizer step.
GPU_RUNS = {
    "88m": {"micro_batch": 16, "grad_accum": 4, "seq_len": 1024},  # the preset's context is 1024
    "1.5b": {"micro_batch": 8, "grad_accum": 4, "seq_len": 2048},
}


# ---------------------------------------------------------------- FLOPs and peaks

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


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int, rounds: int = 3) -> float:
    """Best FLOP/s of an n×n by n×n product (2·n³ FLOPs) over ``rounds`` rounds of ``repeats`` products."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)
    _synchronize(device)
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        _synchronize(device)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2 * n**3 / best


def gpu_spec_peak(device_name: str) -> tuple[float | None, str]:
    """Dense bf16 peak FLOP/s of a GPU and where it came from: $QKRANK_GPU_PEAK_TFLOPS, else the name table."""
    override = os.environ.get(PEAK_ENV)
    if override:
        return float(override) * 1e12, f"${PEAK_ENV}"
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12, f"datasheet ({key})"
    return None, f"unknown device {device_name!r}: set ${PEAK_ENV}"


# ---------------------------------------------------------------- the naive reference model

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

def train_step(model: nn.Module, optimizers: dict, batches: torch.Tensor, autocast, clip: float = 1.0) -> float:
    """One optimizer step as qkrank.train takes it: accumulated forward/backward, clip, step, zero_grad."""
    accum = len(batches)
    loss_sum = 0.0
    for batch in batches:
        with autocast():
            _, loss = model(batch[:, :-1], batch[:, 1:])
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
    """Times train steps of one model with its own optimizers; ``autocast`` is a context factory."""

    def __init__(self, model: nn.Module, batches: torch.Tensor, device: torch.device, autocast=None,
                 optimizer: str = "muon"):
        self.model, self.batches, self.device = model, batches, device
        self.autocast = autocast or contextlib.nullcontext
        self.optimizers = build_optimizers(model, optimizer, BENCH_OPTIM)
        self.seconds: list[float] = []

    def step(self, record: bool = True) -> None:
        _synchronize(self.device)
        t0 = time.perf_counter()
        loss = train_step(self.model, self.optimizers, self.batches, self.autocast)
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


# ---------------------------------------------------------------- CPU training efficiency

def training_efficiency(threads: int, quick: bool) -> dict:
    """tiny preset, micro-batch 16 × seq 256 (4 × 128 quick): tokens/s, MFU vs fp32 matmul peak, speed-up over naive."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    micro_batch, seq_len = (4, 128) if quick else (16, 256)
    steps, warmup, matmul_n = (2, 1, 512) if quick else (8, 2, 1024)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny"))
    naive = naive_copy(model)
    batches = random_batches(model.cfg.vocab_size, 1, micro_batch, seq_len, device)
    flops = model_flops_per_token(model.cfg, matmul_params(model), seq_len)
    real_timer, naive_timer = StepTimer(model, batches, device), StepTimer(naive, batches, device)
    peaks = [matmul_peak(device, torch.float32, matmul_n, repeats=2 if quick else 5)]
    for i in range(warmup + steps):  # interleaved, so drift of the machine's speed hits both alike
        real_timer.step(record=i >= warmup)
        naive_timer.step(record=i >= warmup)
    peaks.append(matmul_peak(device, torch.float32, matmul_n, repeats=2 if quick else 5))
    peak = max(peaks)
    tokens = micro_batch * seq_len
    real = real_timer.summary(tokens, flops["total"], peak, statistic="best")
    ref = naive_timer.summary(tokens, flops["total"], peak, statistic="best")
    return {
        "preset": "tiny", "threads": threads, "micro_batch": micro_batch, "grad_accum": 1, "seq_len": seq_len,
        "optimizer": "muon (hidden matrices) + adamw", "timed_steps": steps, "warmup_steps": warmup,
        "n_params": model.num_params(), "matmul_params": matmul_params(model),
        "flops_formula": FLOPS_FORMULA, "flops_per_token": flops,
        "fp32_matmul_peak_flops": peak, "fp32_matmul_peak_runs": peaks, "matmul_n": matmul_n,
        "real": real, "naive": ref,
        "speedup_over_naive": ref["step_s"] / real["step_s"],
        "goals": {"mfu": GOALS["cpu_mfu"], "speedup_over_naive": GOALS["speedup_over_naive"]},
    }


# ---------------------------------------------------------------- probe cost and memory

def _bench_settings(quick: bool, threads: int, data: dict) -> dict:
    """Cell settings of the default study's ``tiny`` scale, trained for one checkpoint interval."""
    from qkrank import config as qconfig

    study = qconfig.load(qconfig.DEFAULT_CONFIG_PATH)
    scale = copy.deepcopy(study["scales"]["tiny"])
    scale.pop("cell", None)
    train = scale["train"]
    if quick:
        train.update(micro_batch=4, grad_accum=1, seq_len=128, val_tokens=512)
        scale["model"]["vocab_size"] = data["tokenizer"]["vocab_size"]
        scale["probe"]["n_sequences"] = 4
        train["checkpoint_every_tokens"] = train["val_every_tokens"] = 2 * qconfig.tokens_per_step(train)
    interval = train["checkpoint_every_tokens"]
    if interval % train.get("val_every_tokens", interval):
        train["val_every_tokens"] = interval
    train.update(total_tokens=interval, threads=threads)
    scale["optim"]["schedule"]["warmup_tokens"] = 0
    scale["resources"] = {"train": {"cpus": threads}, "probe": {"cpus": threads}}
    config = {"grid": {"scales": ["tiny"], "modes": ["learned"], "optimizers": ["muon"], "seeds": [0]},
              "data": data, "scales": {"tiny": scale}}
    loaded = qconfig.load(config)
    return qconfig.cell_settings(loaded, qconfig.cells(loaded)[0])


def settings_model(settings: dict) -> dict:
    """ModelConfig fields of cell settings: the preset's row with the overrides and the cell's mode."""
    fields = {k: v for k, v in settings["model"].items() if k != "preset"}
    return ModelConfig.from_preset(settings["model"]["preset"], norm_mode=settings["cell"]["mode"],
                                   **fields).to_dict()


def _with_probe(settings: dict, **probe) -> dict:
    out = copy.deepcopy(settings)
    out["probe"].update(probe)
    return out


def probe_cost(work: Path, threads: int, quick: bool) -> tuple[dict, dict]:
    """Train one checkpoint interval and probe it, in-process; then probes of doubling size in fresh processes."""
    from qkrank import config as qconfig
    from qkrank.data import prepare
    from qkrank.probe import probe_snapshot, saves_activations
    from qkrank.train import train_cell

    study = qconfig.load(qconfig.DEFAULT_CONFIG_PATH)
    data_cfg = copy.deepcopy(study["data"])
    if quick:
        data_cfg["tokenizer"]["vocab_size"] = 512
    data_dir, run_dir = work / "data", work / "run"
    prepare(data_cfg, data_dir)
    settings = _bench_settings(quick, threads, data_cfg)
    interval = settings["train"]["checkpoint_every_tokens"]
    t0 = time.perf_counter()
    train_cell(settings, data_dir, run_dir)
    cell_s = time.perf_counter() - t0
    with open(run_dir / "metrics.csv") as f:
        # wall_s runs from the first step, so the interval excludes start-up and the validation at 0.
        train_s = float(list(csv.DictReader(f))[-1]["wall_s"])
    probe_s = {}
    for save_activations in (False, True):
        t0 = time.perf_counter()
        probe_snapshot(_with_probe(settings, save_activations=save_activations), data_dir, run_dir, interval,
                       work / f"probe_act{int(save_activations)}.h5")
        probe_s[save_activations] = time.perf_counter() - t0
    configured = settings["probe"]["save_activations"]
    probe_cfg = settings["probe"]
    probe_tokens = probe_cfg["n_sequences"] * (probe_cfg["seq_len"] or settings["train"]["seq_len"])
    uses_act = saves_activations(configured, ModelConfig(**settings_model(settings)), probe_tokens)
    cost = {
        "preset": "tiny", "threads": threads, "interval_tokens": interval,
        "tokens_per_step": qconfig.tokens_per_step(settings["train"]),
        "interval_train_s": train_s, "train_cell_wall_s": cell_s,
        "probe_tokens": probe_tokens,
        "probe_s_without_act": probe_s[False], "probe_s_with_act": probe_s[True],
        "configured_save_activations": configured, "saves_activations": uses_act,
        "probe_cost_ratio": probe_s[uses_act] / train_s,
        "probe_cost_ratio_without_act": probe_s[False] / train_s,
        "probe_cost_ratio_with_act": probe_s[True] / train_s,
        "what": "interval_train_s = wall_s of the last row of metrics.csv of qkrank.train.train_cell run for "
                "one interval (its steps and validations; start-up and the validation at 0 excluded); "
                "probe_s = qkrank.probe.probe_snapshot of the interval's snapshot (load, sha256, forward, "
                "spectra, HDF5); both in-process on the same threads",
        "goal": GOALS["probe_cost_ratio"],
    }
    sizes = (2, 4) if quick else (8, 16, 32, 64)
    memory = probe_memory(work, settings, data_dir, run_dir, interval, sizes)
    memory["probe_help_wall_s"] = None if quick else _wall([sys.executable, "-m", "qkrank.probe", "--help"])
    return cost, memory


_CHILD = """
import json, sys, time
from pathlib import Path
from qkrank.bench import peak_rss_reset, peak_rss_kb, current_rss_kb
from qkrank.probe import probe_snapshot
settings, data, run, tokens, out = json.loads(Path(sys.argv[1]).read_text()), *sys.argv[2:]
base = current_rss_kb(); reset = peak_rss_reset()
t0 = time.perf_counter()
probe_snapshot(settings, Path(data), Path(run), int(tokens), Path(out))
print(json.dumps({"probe_s": time.perf_counter() - t0, "rss_before_kb": base, "peak_rss_kb": peak_rss_kb(),
                  "peak_reset": reset}))
"""


def current_rss_kb() -> int:
    return _status_kb("VmRSS") or 0


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where /proc does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_kb() -> int:
    """Peak resident set size of this process in KiB (VmHWM; ru_maxrss where /proc is absent)."""
    import resource

    return _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _wall(cmd: list[str], **kwargs) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=_child_env(), **kwargs)
    return time.perf_counter() - t0


def probe_memory(work: Path, settings: dict, data_dir: Path, run_dir: Path, tokens: int, sizes) -> dict:
    """Peak RSS of a probe (save_activations false) as n_sequences doubles, each in a fresh process."""
    rows = []
    for n_sequences in sizes:
        path = work / f"settings_n{n_sequences}.json"
        path.write_text(json.dumps(_with_probe(settings, n_sequences=n_sequences, save_activations=False)))
        cmd = [sys.executable, "-c", _CHILD, str(path), str(data_dir), str(run_dir), str(tokens),
               str(work / f"mem_{n_sequences}.h5")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_child_env())
        wall = time.perf_counter() - t0
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"n_sequences": n_sequences, "probe_tokens": n_sequences * settings["train"]["seq_len"],
                     "peak_rss_mb": child["peak_rss_kb"] / 1024, "rss_before_mb": child["rss_before_kb"] / 1024,
                     "probe_peak_increase_mb": (child["peak_rss_kb"] - child["rss_before_kb"]) / 1024,
                     "peak_reset": child["peak_reset"], "probe_s": child["probe_s"], "job_wall_s": wall,
                     "job_startup_s": wall - child["probe_s"]})
    first, last = rows[0], rows[-1]
    return {"save_activations": False, "runs": rows,
            "peak_rss_ratio_last_over_first": last["peak_rss_mb"] / first["peak_rss_mb"],
            "tokens_ratio_last_over_first": last["probe_tokens"] / first["probe_tokens"],
            "job_startup_s_median": statistics.median(r["job_startup_s"] for r in rows),
            "job_startup_over_probe_s": statistics.median(r["job_startup_s"] / r["probe_s"] for r in rows),
            "what": "peak RSS (VmHWM reset just before the probe) of qkrank.probe.probe_snapshot in a fresh "
                    "python per size; job start-up = process wall time − in-process probe time"}


# ---------------------------------------------------------------- workflow overhead

def overhead_config(n_scales: int, n_seeds: int, n_checkpoints: int) -> dict:
    """A study of n_scales (tiny-shaped) × 3 modes × n_seeds with n_checkpoints probe points per cell."""
    step = 4 * 64
    scale = {"model": {"preset": "tiny", "vocab_size": 512, "n_layers": 1},
             "train": {"seq_len": 64, "micro_batch": 4, "checkpoint_every_tokens": step,
                       "total_tokens": step * (n_checkpoints - 1), "val_tokens": 256}}
    names = [f"s{i}" for i in range(n_scales)]
    return {"grid": {"scales": names, "modes": ["learned", "frozen", "none"], "seeds": list(range(n_seeds))},
            "data": {"tokenizer": {"vocab_size": 512}}, "scales": {name: scale for name in names}}


def workflow_overhead(work: Path, quick: bool) -> dict:
    """Wall time of ``snakemake -n`` over a large grid, from a fresh directory (nothing exists yet)."""
    import yaml

    snakefile = REPO_ROOT / "Snakefile"
    if not snakefile.exists():
        return {"skipped": f"no Snakefile at {snakefile} (qkrank installed without its workflow)"}
    shape = (1, 1, 3) if quick else (2, 5, 26)
    workdir = work / "dryrun"
    workdir.mkdir()
    configfile = workdir / "study.yaml"
    configfile.write_text(yaml.safe_dump(overhead_config(*shape)))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(snakefile), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", "1", "--quiet", "rules"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake -n failed ({proc.returncode}): {proc.stderr[-2000:]}")
    jobs = re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, re.MULTILINE)
    n_jobs = int(jobs.group(1)) if jobs else None
    startup = None if quick else _wall([sys.executable, "-m", "snakemake", "--version"])
    return {"grid": dict(zip(("scales", "seeds", "checkpoints"), shape, strict=True)) | {"modes": 3},
            "n_jobs": n_jobs, "dry_run_s": wall, "snakemake_version_s": startup,
            "dry_run_s_per_job": wall / n_jobs if n_jobs else None, "goal_s": GOALS["dry_run_s"]}


# ---------------------------------------------------------------- GPU training

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
    timer = StepTimer(model, batches, device, _autocast_factory(device, bf16))
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
    out = {"compile": compile_note, "first_step_s": first_step_s, "seconds": timer.seconds,
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
    flops = model_flops_per_token(cfg, result["matmul_params"], seq_len)
    summary = timer.summary(tokens_per_step, flops["total"], peak_flops)
    return {"preset": preset, "device": str(device), "micro_batch": mb, "grad_accum": accum, "seq_len": seq_len,
            "tokens_per_step": tokens_per_step, "bf16": bf16, "attempts": attempts, "timed_steps": steps,
            "flops_formula": FLOPS_FORMULA, "flops_per_token": flops, "peak_flops": peak_flops,
            **{k: v for k, v in result.items() if k != "seconds"}, **summary}


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


def gpu_benchmarks(presets, steps: int, warmup: int) -> dict:
    """The GPU part: bf16 matmul peak measured now, then each preset with bf16 autocast and torch.compile."""
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
        shape = GPU_RUNS[preset]
        run = gpu_training(preset, device, steps=steps, warmup=warmup, peak_flops=spec_peak, **shape)
        if "model_flops_per_s" in run:
            run["mfu_vs_measured_matmul"] = run["model_flops_per_s"] / measured_peak
        out["runs"][preset] = run
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- machine, report, CLI

def machine_info(threads: int) -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = None
    with contextlib.suppress(OSError):
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "git_commit": commit,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _fmt(value, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(results: dict) -> str:
    """One row per measured ratio: what, value, goal."""
    rows = []
    tr = results.get("training")
    if tr:
        rows += [(f"CPU train tokens/s (tiny, {tr['micro_batch']}×{tr['seq_len']}, Muon, {tr['threads']} threads)",
                  f"{tr['real']['tokens_per_s']:,.0f}", ""),
                 ("CPU MFU vs fp32 matmul peak", f"{tr['real']['mfu']:.1%}", f"≥ {GOALS['cpu_mfu']:.0%}"),
                 ("speed-up over naive attention", f"{tr['speedup_over_naive']:.2f}×",
                  f"≥ {GOALS['speedup_over_naive']}×")]
    pc = results.get("probe_cost")
    if pc:
        rows += [("probe ÷ one checkpoint interval of training", f"{pc['probe_cost_ratio']:.1%}",
                  f"≤ {GOALS['probe_cost_ratio']:.0%}"),
                 ("  same, without / with `act`", f"{pc['probe_cost_ratio_without_act']:.1%} / "
                  f"{pc['probe_cost_ratio_with_act']:.1%}", "")]
    pm = results.get("probe_memory")
    if pm:
        rows.append((f"probe peak RSS, ×{pm['tokens_ratio_last_over_first']:.0f} tokens (no `act`)",
                     f"×{pm['peak_rss_ratio_last_over_first']:.2f}", "flat (×1)"))
        rows.append(("probe job start-up ÷ probe compute", f"{pm['job_startup_over_probe_s']:.2f}×", ""))
    wf = results.get("workflow")
    if wf and "skipped" not in wf:
        grid = wf["grid"]
        rows.append((f"`snakemake -n`, {grid['scales']}×3×{grid['seeds']}×{grid['checkpoints']} ({wf['n_jobs']} jobs)",
                     f"{wf['dry_run_s']:.1f} s", f"≤ {GOALS['dry_run_s']:.0f} s"))
    gpu = results.get("gpu")
    if gpu and "skipped" in gpu:
        rows.append(("GPU", "skipped: no CUDA", ""))
    elif gpu:
        for preset, run in gpu["runs"].items():
            if "skipped" in run:
                rows.append((f"GPU {preset}", run["skipped"], ""))
                continue
            goal = f"≥ {GOALS['gpu_mfu_1.5b']:.0%}" if preset == "1.5b" else ""
            rows.append((f"GPU {preset} {run['micro_batch']}×{run['grad_accum']}×{run['seq_len']}: step, tok/s",
                         f"{run['step_s']:.3f} s, {run['tokens_per_s']:,.0f}", ""))
            rows.append((f"GPU {preset} MFU vs {gpu['device_name']} bf16 spec / measured matmul",
                         f"{_fmt(run.get('mfu'), '.1%')} / {run['mfu_vs_measured_matmul']:.1%}", goal))
    lines = ["| measurement | value | goal |", "|---|---:|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def _write_json(out: Path, name: str, obj: dict) -> None:
    atomic_write_text(out / f"{name}.json", json.dumps(obj, indent=2, default=float) + "\n")


def run_cpu(out: Path, quick: bool, threads: int) -> dict:
    """The CPU benchmarks; each result is written as soon as it is measured."""
    machine = machine_info(threads)
    results = {}
    results["training"] = training_efficiency(threads, quick)
    _write_json(out, "training", {"machine": machine, **results["training"]})
    with tempfile.TemporaryDirectory(prefix="qkrank-bench-") as tmp:
        cost, memory = probe_cost(Path(tmp), threads, quick)
        results["probe_cost"], results["probe_memory"] = cost, memory
        _write_json(out, "probe", {"machine": machine, "cost": cost, "memory": memory})
        results["workflow"] = workflow_overhead(Path(tmp), quick)
        _write_json(out, "workflow", {"machine": machine, **results["workflow"]})
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="qkrank bench", description="Measure training, probe, workflow and "
                                     "GPU efficiency; JSON to --out, a Markdown table to stdout.")
    parser.add_argument("--quick", action="store_true", help="few steps and small sizes (a smoke test, not numbers "
                        "to report)")
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="directory for the JSON results")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch CPU threads (default: all cores this process may use)")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU part (bench/gpu.sh)")
    parser.add_argument("--preset", action="append", choices=sorted(GPU_RUNS),
                        help="GPU preset(s) to measure (default: all)")
    parser.add_argument("--gpu-steps", type=int, default=10, help="timed optimizer steps per GPU preset")
    parser.add_argument("--gpu-peak-tflops", type=float, help=f"dense bf16 peak of the GPU (overrides the name "
                        f"table; also ${PEAK_ENV})")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.gpu_peak_tflops is not None:
        os.environ[PEAK_ENV] = str(args.gpu_peak_tflops)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {} if args.gpu_only else run_cpu(args.out, args.quick, args.threads)
    presets = args.preset or list(GPU_RUNS)
    gpu = gpu_benchmarks(presets, steps=2 if args.quick else args.gpu_steps, warmup=2)
    results["gpu"] = gpu
    if "skipped" in gpu:
        print(f"qkrank.bench: {gpu['skipped']}", file=sys.stderr)
    name = "gpu" if not args.preset else "gpu_" + "_".join(presets)
    _write_json(args.out, name, {"machine": machine_info(args.threads), **gpu})
    table = markdown_table(results)
    atomic_write_text(args.out / ("bench.md" if not args.gpu_only else f"{name}.md"), table)
    print(table)


if __name__ == "__main__":
    main()
