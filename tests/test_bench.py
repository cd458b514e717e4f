"""The benchmark suite: quick mode runs end to end, its FLOP count is right, its naive model is the same model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, env_with_src
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from qkrank import runtime
from qkrank.bench import cli, core, gpu, roofline, steps
from qkrank.model import GPT, ModelConfig

SMALL = {"vocab_size": 96, "n_layers": 2, "max_seq_len": 64}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "qkrank.bench", "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env_with_src(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_mode_writes_sane_positive_numbers(quick_results):
    out, proc = quick_results
    training = json.loads((out / "training.json").read_text())
    native = runtime.cpu_has_native_bf16()
    dtypes = ["fp32", "bf16"] if native else ["fp32"]
    assert training["training_precision"] == dtypes[-1] and sorted(training["matmul_peak_flops"]) == sorted(dtypes)
    for model in ("real", "naive", *dtypes):
        for key in ("step_s", "step_s_median", "tokens_per_s", "model_flops_per_s", "mfu"):
            assert _positive(training[model][key]), (model, key, training[model][key])
        assert training[model]["step_s"] == min(training[model]["step_s_all"])
    for name in dtypes:  # MFU against the dtype's own peak, and against fp32's for comparison
        run, peaks = training[name], training["matmul_peak_flops"]
        assert run["mfu"] == pytest.approx(run["model_flops_per_s"] / peaks[name])
        assert run["mfu_vs_fp32_peak"] == pytest.approx(run["model_flops_per_s"] / peaks["fp32"])
    assert training["real"] == training[training["training_precision"]]
    assert _positive(training["fp32_matmul_peak_flops"]) and _positive(training["speedup_over_naive"])
    if native:
        assert training["bf16_over_fp32_tokens_per_s"] == pytest.approx(
            training["bf16"]["tokens_per_s"] / training["fp32"]["tokens_per_s"])
    for name in dtypes:  # the GEMM roofline: the step's GEMMs timed alone, and the MFU they alone would allow
        roof, run = training["gemm_roofline"][name], training[name]
        assert roof["gemm_s"] == pytest.approx(sum(g["seconds"] for g in roof["gemms"]))
        tokens, peak = training["micro_batch"] * training["seq_len"], training["matmul_peak_flops"][name]
        assert roof["model_flops"] == training["flops_per_token"]["total"] * tokens
        assert roof["mfu_ceiling"] == pytest.approx(roof["model_flops"] / roof["gemm_s"] / peak)
        assert 0 < run["of_gemm_roofline"] == pytest.approx(roof["gemm_s"] / run["step_s"])
    assert training["flops_formula"] == core.FLOPS_FORMULA and training["machine"]["threads"] == 1
    probe = json.loads((out / "probe.json").read_text())
    assert _positive(probe["cost"]["interval_train_s"]) and _positive(probe["cost"]["probe_cost_ratio"])
    runs = probe["memory"]["runs"]
    assert [r["probe_tokens"] for r in runs] == [runs[0]["probe_tokens"] * 2**i for i in range(len(runs))]
    assert all(_positive(r["peak_rss_mb"]) and _positive(r["job_startup_s"]) for r in runs)
    job = probe["cost"]["job"]
    assert _positive(job["work_s"]) and job["job_wall_s"] == min(job["job_wall_s_all"])
    assert job["startup_over_work"] == pytest.approx((job["job_wall_s"] - job["work_s"]) / job["work_s"])
    assert job["forked_job_wall_s"] == min(job["forked_job_wall_s_all"])
    assert job["forked_startup_s"] < job["startup_s"], "a forked probe job should start faster than a new process"
    workflow = json.loads((out / "workflow.json").read_text())
    assert workflow["n_jobs"] > 10 and _positive(workflow["dry_run_s"])
    gpu = json.loads((out / "gpu.json").read_text())
    if not torch.cuda.is_available():
        assert "skipped" in gpu and "runs" not in gpu, "without CUDA nothing may be reported for the GPU"
        assert "CUDA is not available" in proc.stderr
    table = (out / "bench.md").read_text()
    assert table in proc.stdout and "CPU MFU fp32 vs fp32 matmul peak" in table and "`snakemake -n`" in table
    assert "start-up ÷ work" in table and ("CPU MFU bf16 vs bf16 matmul peak" in table) == native


def _counted_flops(model, idx) -> int:
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
    return counter.get_total_flops()


def test_flop_formula_equals_torch_flop_counter():
    """6·N + 12·L·d·T per token is what torch counts for one forward+backward of the naive model, whose
    attention is plain matmuls; the fused model counts the same where torch counts its SDPA kernel."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", **SMALL))
    batch, seq_len = 3, 48
    idx = torch.randint(0, SMALL["vocab_size"], (batch, seq_len + 1))
    per_token = core.model_flops_per_token(model.cfg, core.matmul_params(model), seq_len)
    tokens = batch * seq_len
    assert _counted_flops(steps.naive_copy(model), idx) == per_token["total"] * tokens
    # torch's counter has no formula for the CPU flash-attention kernel: there it sees the dense part only.
    assert _counted_flops(model, idx) in (per_token["total"] * tokens, per_token["dense"] * tokens)


class _GemmShapes(TorchDispatchMode):
    """Records (batch, m, k, n, a transposed, b transposed) of every matrix product dispatched."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default):
            a, b = args[-2], args[-1]
            batch = a.shape[0] if a.dim() == 3 else 1
            self.shapes.append((batch, a.shape[-2], a.shape[-1], b.shape[-1], not a.is_contiguous(),
                                not b.is_contiguous()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "n_kv_heads": 1, "d_ff": 96}])
def test_step_gemms_are_the_products_autograd_runs(overrides):
    """The roofline's list is what one forward+backward of the naive model (attention as plain matmuls)
    dispatches, shape for shape and layout for layout, and its FLOPs are the formula's, with gradient
    accumulation too."""
    torch.manual_seed(0)
    model = steps.naive_copy(GPT(ModelConfig.from_preset("tiny", **{**SMALL, **overrides})))
    batch, seq_len = 3, 48
    idx = torch.randint(0, SMALL["vocab_size"], (batch, seq_len + 1))
    with _GemmShapes() as seen:
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
    listed = roofline.step_gemms(model.cfg, batch, seq_len)
    expected = [(g.batch, g.m, g.k, g.n, g.a_transposed, g.b_transposed) for g in listed for _ in range(g.count)]
    assert sorted(seen.shapes) == sorted(expected)
    per_token = core.model_flops_per_token(model.cfg, core.matmul_params(model), seq_len)["total"]
    assert sum(g.flops for g in listed) == per_token * batch * seq_len
    assert sum(g.flops for g in roofline.step_gemms(model.cfg, batch, seq_len, grad_accum=2)) == \
        2 * per_token * batch * seq_len


def test_roofline_times_each_shape_once_with_the_layout_autograd_passes():
    cfg = ModelConfig.from_preset("tiny", **SMALL)
    gen = torch.Generator().manual_seed(0)
    for g in roofline.step_gemms(cfg, 2, 16):
        a, b = roofline._operands(g, torch.float32, torch.device("cpu"), gen)
        assert torch.matmul(a, b).shape == ((g.m, g.n) if g.batch == 1 else (g.batch, g.m, g.n)), g
        assert a.is_contiguous() != g.a_transposed and b.is_contiguous() != g.b_transposed, g
    result = roofline.gemm_roofline(cfg, 2, 16, torch.float32, torch.device("cpu"), peak_flops=1e9, round_s=0.001)
    assert result["distinct_shapes"] == len({g.shape for g in roofline.step_gemms(cfg, 2, 16)})
    assert all(_positive(r["seconds"]) for r in result["gemms"]) and result["dtype"] == "float32"


def test_matmul_params_counts_every_linear_weight_once():
    cfg = ModelConfig.from_preset("tiny", **SMALL)
    d, kv, ff = cfg.d_model, cfg.kv_dim, cfg.d_ff
    per_layer = 2 * d * d + 2 * d * kv + 2 * d * ff
    expected = cfg.n_layers * per_layer + cfg.vocab_size * d  # the (tied) output head once
    assert core.matmul_params(GPT(cfg)) == expected


@pytest.mark.parametrize("mode", ["learned", "frozen", "none"])
def test_naive_model_computes_the_same_logits(mode):
    torch.manual_seed(1)
    model = GPT(ModelConfig.from_preset("tiny", norm_mode=mode, **SMALL))
    for block in model.blocks:  # non-trivial γ, so the norms are exercised too
        if block.attn.q_norm is not None:
            block.attn.q_norm.weight.data.uniform_(0.5, 1.5)
    naive = steps.naive_copy(model)
    assert all(type(b.attn) is steps.NaiveAttention for b in naive.blocks)
    assert all(type(b.attn) is not steps.NaiveAttention for b in model.blocks)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(naive(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_gpu_path_runs_on_cpu_with_a_tiny_config():
    result = gpu.gpu_training("tiny", device="cpu", micro_batch=2, grad_accum=2, seq_len=32, steps=2, warmup=1,
                                bf16=False, compile_model=False, peak_flops=1e11, overrides=SMALL)
    assert result["attempts"] == [{"micro_batch": 2, "grad_accum": 2, "fits": True}]
    assert result["tokens_per_step"] == 2 * 2 * 32 and len(result["step_s_all"]) == 2
    for key in ("step_s_median", "tokens_per_s", "model_flops_per_s", "mfu", "of_gemm_roofline"):
        assert _positive(result[key]), key
    roof = result["gemm_roofline"]  # the GEMMs of the whole accumulated step, in the step's dtype
    assert roof["dtype"] == "float32" and roof["model_flops"] == result["flops_per_token"]["total"] * 2 * 2 * 32
    assert roof["mfu_ceiling"] == pytest.approx(roof["model_flops"] / roof["gemm_s"] / 1e11)
    assert result["of_gemm_roofline"] == pytest.approx(roof["gemm_s"] / result["step_s"])
    assert "GPU tiny: its own GEMMs timed alone" in cli.markdown_table({"gpu": {"device_name": "cpu", "runs": {
        "tiny": {**result, "mfu_vs_measured_matmul": 0.5}}}})


def test_a_gpu_roofline_out_of_memory_keeps_the_step_figures(monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.6 GiB")

    monkeypatch.setattr(gpu, "gemm_roofline", no_memory)
    result = gpu.gpu_training("tiny", device="cpu", micro_batch=2, grad_accum=1, seq_len=16, steps=1, warmup=1,
                              bf16=False, compile_model=False, peak_flops=1e11, overrides=SMALL)
    assert _positive(result["tokens_per_s"]) and "of_gemm_roofline" not in result
    assert result["gemm_roofline"]["skipped"].startswith("out of memory: CUDA out of memory")
    table = cli.markdown_table({"gpu": {"device_name": "cpu", "runs": {"tiny": {**result,
                                                                                 "mfu_vs_measured_matmul": 0.5}}}})
    assert "| out of memory: CUDA out of memory" in table


def test_gpu_path_halves_the_micro_batch_when_out_of_memory(monkeypatch):
    measure = gpu._measure_attempt

    def fits_only_two(cfg, device, micro_batch, *args):
        if micro_batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return measure(cfg, device, micro_batch, *args)

    monkeypatch.setattr(gpu, "_measure_attempt", fits_only_two)
    result = gpu.gpu_training("tiny", device="cpu", micro_batch=8, grad_accum=1, seq_len=16, steps=1, warmup=1,
                                bf16=False, compile_model=False, overrides=SMALL)
    assert [(a["micro_batch"], a["grad_accum"], a["fits"]) for a in result["attempts"]] == [
        (8, 1, False), (4, 2, False), (2, 4, True)]
    assert result["tokens_per_step"] == 8 * 16 and result["micro_batch"] * result["grad_accum"] == 8


def test_gpu_path_falls_back_to_eager_when_the_compiled_step_fails(monkeypatch, capsys):
    from qkrank.model import Block

    def broken_compile(self, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("inductor exploded (simulated)")
        self.forward = fail

    monkeypatch.setattr(Block, "compile", broken_compile)
    result = gpu.gpu_training("tiny", device="cpu", micro_batch=2, grad_accum=1, seq_len=16, steps=1, warmup=1,
                                bf16=False, compile_model=True, overrides=SMALL)
    assert result["compile"].startswith("failed (RuntimeError: inductor exploded") and result["compile"].endswith(
        "eager")
    assert _positive(result["tokens_per_s"])
    assert "torch.compile failed" in capsys.readouterr().err


def test_gpu_peak_comes_from_the_device_name_or_the_override(monkeypatch):
    monkeypatch.delenv(gpu.PEAK_ENV, raising=False)
    assert gpu.gpu_spec_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert gpu.gpu_spec_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu.gpu_spec_peak("NVIDIA H200")[0] == 989e12
    peak, source = gpu.gpu_spec_peak("Some Future GPU")
    assert peak is None and gpu.PEAK_ENV in source
    monkeypatch.setenv(gpu.PEAK_ENV, "500")
    assert gpu.gpu_spec_peak("NVIDIA H100 PCIe") == (500e12, f"${gpu.PEAK_ENV}")


def test_gpu_micro_batch_keeps_the_tokens_per_step_and_a_bad_one_is_refused_at_once(tmp_path):
    assert gpu.gpu_shape("88m") == gpu.GPU_RUNS["88m"]
    assert gpu.gpu_shape("88m", 64) == {"micro_batch": 64, "grad_accum": 1, "seq_len": 1024}
    assert gpu.gpu_shape("1.5b", 2) == {"micro_batch": 2, "grad_accum": 16, "seq_len": 2048}
    proc = subprocess.run([sys.executable, "-m", "qkrank.bench", "--gpu-micro-batch", "48", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env_with_src(), timeout=120)
    assert proc.returncode == 2 and "--gpu-micro-batch 48: 88m's step of 65,536 tokens" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir()), "refused before measuring anything"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_script_skips_without_cuda_and_says_so(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), str(tmp_path)], capture_output=True, text=True,
                          env=env_with_src(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "CUDA is not available" in proc.stderr
    assert "skipped" in json.loads((tmp_path / "gpu.json").read_text())
    assert "skipped" in json.loads((tmp_path / "gpu_88m_mb64.json").read_text()), "88m at micro-batch 64 too"


def test_without_native_bf16_the_cpu_benchmark_measures_fp32_only(monkeypatch):
    from qkrank.bench import cpu

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    threads = torch.get_num_threads()
    try:
        result = cpu.training_efficiency(1, quick=True)
    finally:
        torch.set_num_threads(threads)
    assert result["training_precision"] == "fp32" and "bf16" not in result
    assert list(result["matmul_peak_flops"]) == ["fp32"] and result["real"] == result["fp32"]
    assert "bf16_over_fp32_tokens_per_s" not in result


def test_study_time_sums_job_seconds_per_kind_and_the_probe_share(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    jobs = {"train/tiny/learned/muon/seed0.tsv": (100.0, 90.0), "train/tiny/none/muon/seed0.tsv": (80.0, 70.0),
            "probe/tiny/none/muon/seed0/0.tsv": (2.0, 1.5), "probe/tiny/none/muon/seed0/256.tsv": (3.0, 2.5),
            "data.tsv": (4.0, 1.0)}
    for rel, (s, cpu) in jobs.items():
        path = tmp_path / "benchmarks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{s}\t0:00:01\t1\t1\t1\t1\t0\t0\t50\t{cpu}\n")
    # a job the fork server ran: the benchmark measured its launcher (0.05 CPU-s), the log has the job's own
    log = tmp_path / "logs" / "probe/tiny/none/muon/seed0/512.log"
    log.parent.mkdir(parents=True)
    log.write_text("probing\nqkrank: forked by qkrank.forkserver: 1.95 CPU-s, peak RSS 324 MB\n")
    (tmp_path / "benchmarks" / "probe/tiny/none/muon/seed0/512.tsv").write_text(
        header + "2.5\t0:00:02\t1\t1\t1\t1\t0\t0\t50\t0.05\n")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "study_time.py"), str(tmp_path), "--wall", "50",
                           "--cores", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| 2 | train | 180.0 | 160.0 | 94.0% |" in proc.stdout
    assert "| 3 | probe | 7.5 | 6.0 | 3.9% |" in proc.stdout and "| 1 | data | 4.0 | 1.0 |" in proc.stdout
    assert "probe jobs ÷ (2 cores × 50 s wall) = 7.5%" in proc.stdout  # 7.5 s of probes in 100 core-seconds


def test_state_packing_bench_measures_a_trained_state_and_a_state_file(tmp_path):
    import re

    from conftest import micro_config, write_config

    from qkrank import checkpoint, state_packing

    config = write_config(tmp_path / "micro.yaml", micro_config())
    script = [sys.executable, str(REPO / "bench" / "state_packing.py")]
    proc = subprocess.run([*script, "--config", str(config), "--steps", "2", "--seq-len", "16", "--batch", "2"],
                          capture_output=True, text=True, timeout=300, env=env_with_src(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ratios = {m[1]: float(m[2]) for m in re.finditer(r"^\| ([a-z ]+) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|",
                                                      proc.stdout, re.M)}
    assert set(ratios) == {"weights", "muon state", "adamw state", "whole state"}
    assert all(0.5 < r < 0.9 for r in ratios.values()), ratios  # the high byte of every float32 shrinks
    state = {"model": {"w": torch.randn(256, 256) * 0.02}, "optimizers": {"muon": {"m": torch.randn(256, 256)}}}
    checkpoint.save_state(state, tmp_path / "1.pt")
    assert state_packing.MARKER in torch.load(tmp_path / "1.pt", weights_only=True)["model"]["w"]
    proc = subprocess.run([*script, "--state", str(tmp_path / "1.pt")], capture_output=True, text=True,
                          timeout=300, env=env_with_src(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| weights | 0.3 |" in proc.stdout  # measured on the unpacked tensors: 262 kB plain
