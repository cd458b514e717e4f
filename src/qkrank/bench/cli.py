"""The machine block, the Markdown table and the command line of ``qkrank bench``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qkrank.atomic import atomic_write_text
from qkrank.bench.core import GOALS, REPO_ROOT
from qkrank.bench.cpu import training_efficiency
from qkrank.bench.gpu import GPU_RUNS, PEAK_ENV, gpu_benchmarks, gpu_shape
from qkrank.bench.probe_cost import probe_cost
from qkrank.bench.workflow import workflow_overhead


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
        threads = f"{tr['threads']} thread{'s' if tr['threads'] > 1 else ''}"
        shape = f"tiny, {tr['micro_batch']}×{tr['seq_len']}, Muon, {threads}"
        for name in ("fp32", "bf16"):
            if name not in tr:
                continue
            run, peak = tr[name], tr["matmul_peak_flops"][name]
            used = " (what training uses)" if name == tr["training_precision"] else ""
            rows.append((f"CPU train tokens/s, {name}{used} ({shape})", f"{run['tokens_per_s']:,.0f}", ""))
            rows.append((f"CPU MFU {name} vs {name} matmul peak ({peak / 1e9:,.0f} GFLOP/s)", f"{run['mfu']:.1%}",
                         f"≥ {GOALS['cpu_mfu']:.0%}" if used else ""))
            if name != "fp32":
                rows.append((f"CPU MFU {name} vs fp32 matmul peak", f"{run['mfu_vs_fp32_peak']:.1%}", ""))
            roof = tr["gemm_roofline"][name]
            rows.append((f"CPU {name}: the step's own GEMMs timed alone (its GEMM roofline) ÷ the step",
                         f"{roof['gemm_s'] * 1e3:,.1f} ms ÷ {run['step_s'] * 1e3:,.1f} ms = "
                         f"{run['of_gemm_roofline']:.1%}", ""))
            rows.append((f"CPU {name}: MFU ceiling, if nothing but those GEMMs took time", f"{roof['mfu_ceiling']:.1%}",
                         ""))
        if "bf16_over_fp32_tokens_per_s" in tr:
            rows.append(("bf16 ÷ fp32: train tokens/s, matmul peak", f"{tr['bf16_over_fp32_tokens_per_s']:.2f}×, "
                         f"{tr['bf16_over_fp32_matmul_peak']:.2f}×", ""))
        rows.append((f"speed-up over naive attention ({tr['training_precision']})", f"{tr['speedup_over_naive']:.2f}×",
                     f"≥ {GOALS['speedup_over_naive']}×"))
    pc = results.get("probe_cost")
    if pc:
        rows += [("probe ÷ one checkpoint interval of training", f"{pc['probe_cost_ratio']:.1%}",
                  f"≤ {GOALS['probe_cost_ratio']:.0%}"),
                 ("  same, without / with `act`", f"{pc['probe_cost_ratio_without_act']:.1%} / "
                  f"{pc['probe_cost_ratio_with_act']:.1%}", "")]
        job = pc["job"]
        rows.append(("probe job, a process of its own: start-up ÷ work",
                     f"{job['startup_s']:.2f} s ÷ {job['work_s']:.2f} s = {job['startup_over_work']:.1f}×", ""))
        rows.append(("probe job as the workflow runs it (launcher + fork server): start-up ÷ work",
                     f"{job['forked_startup_s']:.2f} s ÷ {job['work_s']:.2f} s = "
                     f"{job['forked_startup_over_work']:.1f}×", ""))
    pm = results.get("probe_memory")
    if pm:
        rows.append((f"probe peak RSS, ×{pm['tokens_ratio_last_over_first']:.0f} tokens (no `act`)",
                     f"×{pm['peak_rss_ratio_last_over_first']:.2f}", "flat (×1)"))
        rows.append(("probe job start-up ÷ probe compute (in-process child)", f"{pm['job_startup_over_probe_s']:.2f}×",
                     ""))
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
            roof = run["gemm_roofline"]
            rows.append((f"GPU {preset}: its own GEMMs timed alone ÷ the step; MFU ceiling vs spec",
                         roof["skipped"] if "skipped" in roof else
                         f"{roof['gemm_s']:.3f} s ÷ {run['step_s']:.3f} s = {run['of_gemm_roofline']:.1%}; "
                         f"{_fmt(roof['mfu_ceiling'], '.1%')}", ""))
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
    parser.add_argument("--gpu-micro-batch", type=int, help="GPU micro-batch (default: each preset's own); "
                        "accumulation changes so a step keeps its tokens")
    parser.add_argument("--gpu-peak-tflops", type=float, help=f"dense bf16 peak of the GPU (overrides the name "
                        f"table; also ${PEAK_ENV})")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    presets = args.preset or list(GPU_RUNS)
    try:  # before the CPU part's minutes
        for preset in presets:
            gpu_shape(preset, args.gpu_micro_batch)
    except ValueError as e:
        parser.error(str(e))
    if "GLIBC_TUNABLES" not in os.environ:
        # Measure the step as the workflow's jobs run it (qkrank.launch: freed memory kept in the process); the
        # allocator reads its tunables only when a process starts.
        from qkrank.launch import job_env

        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "qkrank.bench", *argv], job_env(os.environ))
    if args.gpu_peak_tflops is not None:
        os.environ[PEAK_ENV] = str(args.gpu_peak_tflops)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {} if args.gpu_only else run_cpu(args.out, args.quick, args.threads)
    gpu = gpu_benchmarks(presets, steps=2 if args.quick else args.gpu_steps, warmup=2,
                         micro_batch=args.gpu_micro_batch)
    results["gpu"] = gpu
    if "skipped" in gpu:
        print(f"qkrank.bench: {gpu['skipped']}", file=sys.stderr)
    name = "gpu" if not args.preset else "gpu_" + "_".join(presets)
    if args.gpu_micro_batch:
        name += f"_mb{args.gpu_micro_batch}"
    _write_json(args.out, name, {"machine": machine_info(args.threads), **gpu})
    table = markdown_table(results)
    atomic_write_text(args.out / ("bench.md" if not args.gpu_only else f"{name}.md"), table)
    print(table)


if __name__ == "__main__":
    main()
