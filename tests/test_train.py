"""The training loop's parts: intervals, batches, accumulation, validation, GPU switches, progress, checkpoints."""

from __future__ import annotations

import dataclasses
import io
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import micro_config

from qkrank import checkpoint, runtime
from qkrank import config as qconfig
from qkrank.data import TokenShards
from qkrank.metrics import COLUMNS, DETERMINISTIC_COLUMNS, Progress, rows_to_csv
from qkrank.settings import CellSettings
from qkrank.train import _forward_backward, batch_starts, build_model, validation_loss

CPU = runtime.Runtime(device=torch.device("cpu"), bf16=False, compile=False, tf32=False)


def _micro(train=None, schedule=None) -> dict:
    cfg = micro_config()
    cfg["scales"]["tiny"]["train"].update(train or {})
    if schedule:
        cfg["scales"]["tiny"]["optim"] = {"schedule": schedule}
    return cfg


def _settings(cfg: dict | None = None) -> dict:
    loaded = qconfig.load(cfg or micro_config())
    return qconfig.cell_settings(loaded, qconfig.cells(loaded)[0])


# ---------------------------------------------------------------- batch, schedule and interval config

# micro config: micro_batch 4 × grad_accum 1 × seq_len 64 = 256 tokens per optimizer step.
BAD_INTERVALS = [
    ("train.total_tokens", {"total_tokens": 2000}, None, "1792 or 2048"),
    ("train.checkpoint_every_tokens", {"checkpoint_every_tokens": 600}, None, "512 or 768"),
    ("train.checkpoint_every_tokens", {"checkpoint_every_tokens": 100}, None, "256"),
    ("train.val_every_tokens", {"val_every_tokens": 1000}, None, "768 or 1024"),
    ("optim.schedule.warmup_tokens", {}, {"warmup_tokens": 100}, "0 or 256"),
    # Accumulation changes the step: 4 × 2 × 64 = 512, so 768 is no longer valid.
    ("train.checkpoint_every_tokens", {"grad_accum": 2, "checkpoint_every_tokens": 768}, None, "512 or 1024"),
]


@pytest.mark.parametrize("field,train,schedule,nearest", BAD_INTERVALS)
def test_interval_not_a_multiple_of_the_step_names_field_and_nearest_values(field, train, schedule, nearest):
    with pytest.raises(qconfig.ConfigError) as err:
        qconfig.load(_micro(train, schedule))
    message = str(err.value)
    assert f"'scales.tiny.{field}'" in message, message
    assert message.endswith(f"nearest valid values: {nearest}"), message
    assert "tokens per optimizer step" in message


def test_batch_and_schedule_come_from_config():
    settings = _settings(_micro({"micro_batch": 2, "grad_accum": 4, "grad_clip": 0.5},
                                {"warmup_tokens": 512, "decay": "linear"}))
    assert qconfig.tokens_per_step(settings["train"]) == 2 * 4 * 64
    assert settings["train"]["grad_clip"] == 0.5
    assert settings["optim"]["schedule"] == {"warmup_tokens": 512, "decay": "linear", "min_lr_ratio": 0.1}
    # The seed-004 batch: 8 × 4 × 2048 tokens.
    assert qconfig.tokens_per_step({"micro_batch": 8, "grad_accum": 4, "seq_len": 2048}) == 65_536


def test_batches_are_a_pure_function_of_seed_and_step():
    a = batch_starts(3, 17, 10_000, 8)
    np.random.seed(123)  # global RNG state must not matter
    random.seed(5)
    assert np.array_equal(a, batch_starts(3, 17, 10_000, 8))
    assert not np.array_equal(a, batch_starts(3, 18, 10_000, 8))
    assert not np.array_equal(a, batch_starts(4, 17, 10_000, 8))
    assert a.min() >= 0 and a.max() < 10_000


def test_gradient_accumulation_matches_one_big_batch(micro_data):
    """grad_accum 2 × micro 2 gives the gradient of one micro-batch of 4 (mean loss over the same rows)."""
    settings = _settings()
    shards = TokenShards(micro_data)
    starts = batch_starts(0, 0, shards.n_windows("train", 65), 4)
    grads = []
    for shape in ((1, 4), (2, 2)):
        model = build_model(settings, shards.vocab_size)
        loss = _forward_backward(model, model, shards, starts.reshape(shape), CPU, 64)
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_validation_loss_is_the_mean_over_fixed_held_out_windows(micro_data):
    settings = _settings()
    shards = TokenShards(micro_data)
    windows = shards.fixed_windows("val", 6, 65)
    assert np.array_equal(windows, shards.fixed_windows("val", 6, 65))  # the same tokens every time
    model = build_model(settings, shards.vocab_size)
    got = validation_loss(model, windows, 4, CPU)  # chunks of 4 and 2: weighting by rows matters
    x = torch.from_numpy(windows)
    with torch.no_grad():
        logits = model(x[:, :-1])
    brute = F.cross_entropy(logits.flatten(0, 1).double(), x[:, 1:].flatten()).item()
    assert got == pytest.approx(brute, rel=1e-6)
    assert model.training  # put back in training mode


# ---------------------------------------------------------------- GPU switches and runtime

@pytest.mark.parametrize("cuda,bf16_native,config,expected", [
    (False, False, "auto", {"bf16": False, "compile": False, "tf32": False, "fused": False}),
    (False, True, "auto", {"bf16": True, "compile": False, "tf32": False, "fused": False}),  # AVX512-BF16 or AMX
    (True, True, "auto", {"bf16": True, "compile": True, "tf32": True, "fused": True}),
    (True, False, "auto", {"bf16": False, "compile": True, "tf32": True, "fused": True}),  # e.g. a V100
    (True, True, False, {"bf16": False, "compile": False, "tf32": False, "fused": False}),
    (False, True, False, {"bf16": False, "compile": False, "tf32": False, "fused": False}),
    (False, False, True, {"bf16": True, "compile": True, "tf32": False, "fused": True}),  # no TF32 on CPU
])
def test_switches_resolve_from_config_and_hardware(cuda, bf16_native, config, expected):
    train = dataclasses.replace(CellSettings.from_dict(_settings()).train, bf16=config, compile=config, tf32=config,
                                fused=config)
    assert runtime.resolve_switches(train, cuda=cuda, bf16_native=bf16_native) == expected


@pytest.mark.parametrize("flags,native", [
    ("fpu sse avx2 avx512f avx512bw avx512_bf16 avx512_vnni", True),  # Zen 4, Cooper Lake
    ("fpu sse avx2 avx512f amx_tile amx_bf16 amx_int8", True),  # Sapphire Rapids
    ("fpu sse avx2 avx512f avx512bw avx512_vnni", False),  # Skylake-SP: bf16 would be emulated
    ("fp asimd bf16 i8mm", False),  # an Arm flag of another name is not taken for x86's
])
def test_native_bf16_is_read_from_the_cpu_flags(flags, native):
    cpuinfo = f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert bool(runtime.cpu_flags(cpuinfo) & set(runtime.CPU_BF16_FLAGS)) is native
    assert runtime.cpu_flags("no flags here") == set()


def test_bad_switch_value_is_rejected():
    with pytest.raises(ValueError, match="'auto', true, false"):
        runtime.resolve_switch("yes", True)


def test_device_resolution():
    assert runtime.resolve_device("auto", 1, cuda_available=True) == torch.device("cuda", 1)
    assert runtime.resolve_device("auto", 1, cuda_available=False) == torch.device("cpu")
    assert runtime.resolve_device("cpu", 0, cuda_available=True) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="train.device"):
        runtime.resolve_device("cuda", 0, cuda_available=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_runtime_on_cpu_selects_the_cpu_path():
    threads = torch.get_num_threads()
    try:
        rt = runtime.init(CellSettings.from_dict(_settings()).train, job_cpus=2)
        native = runtime.cpu_has_native_bf16()  # `auto`: bf16 exactly where the CPU has it natively
        assert (rt.device, rt.bf16, rt.compile, rt.tf32, rt.fused, rt.world_size, rt.backend) == \
            (torch.device("cpu"), native, False, False, False, 1, None)
        assert torch.get_num_threads() == 2
        assert isinstance(rt.autocast(), torch.autocast if native else type(CPU.autocast()))
    finally:
        torch.set_num_threads(threads)
    assert runtime.Runtime(torch.device("cpu"), False, False, False, rank=1, world_size=2).backend == "gloo"
    assert runtime.Runtime(torch.device("cuda", 0), True, True, True, world_size=2).backend == "nccl"


# What each job module runs first and last as __main__: collections off, its imports, imports_done, main().
JOB_START = """
import gc, runpy, sys
collections = []
# A collection while torch is being imported, before anything is frozen, is one the job should have skipped.
gc.callbacks.append(lambda phase, info: phase == "start" and gc.get_freeze_count() == 0
                    and "torch" in sys.modules and collections.append(phase))
sys.argv = [{module!r}, "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(gc.isenabled(), gc.get_freeze_count(), len(collections), "torch._dynamo" in sys.modules)
"""


@pytest.mark.parametrize("module", ["qkrank.train", "qkrank.probe", "qkrank.probe_hf"])
def test_a_job_imports_with_collections_off_then_collects_with_its_imports_frozen(module):
    out = subprocess.run([sys.executable, "-c", JOB_START.format(module=module)], capture_output=True, text=True,
                         check=True).stdout.split()
    enabled, frozen, collections_while_importing_torch, dynamo = out[-4:]
    assert enabled == "True"
    assert int(frozen) > 50_000  # torch's import alone leaves ~10⁵ tracked objects
    assert collections_while_importing_torch == "0"
    assert (dynamo == "True") is (module == "qkrank.train")  # preloaded for torch.optim, frozen with the rest


def test_bf16_switch_autocasts_the_forward_pass(micro_data):
    model = build_model(_settings(), TokenShards(micro_data).vocab_size)
    x = torch.zeros(1, 8, dtype=torch.long)
    bf16 = runtime.Runtime(torch.device("cpu"), bf16=True, compile=False, tf32=False)
    with bf16.autocast():
        assert model(x).dtype == torch.bfloat16
    with CPU.autocast():
        assert model(x).dtype == torch.float32


# ---------------------------------------------------------------- observability

def test_metrics_columns_are_those_of_the_issue():
    assert COLUMNS == ("tokens_seen", "step", "train_loss", "val_loss", "lr_muon", "lr_adamw", "grad_norm",
                       "tokens_per_s", "wall_s")
    assert set(DETERMINISTIC_COLUMNS) == set(COLUMNS) - {"tokens_per_s", "wall_s"}
    text = rows_to_csv([{"tokens_seen": 0, "step": 0, "val_loss": 6.5}])
    assert text.splitlines() == [",".join(COLUMNS), "0,0,,6.5,,,,,"]
    with pytest.raises(ValueError):
        rows_to_csv([{"tokens_seen": 0, "no_such_column": 1}])


def test_progress_prints_plain_lines_without_a_terminal():
    stream = io.StringIO()
    progress = Progress("cell", 1000, 0, tty=False, every_s=3600, stream=stream)
    progress.update(100, 100, 5.0, 1234.0)  # within every_s: silent
    progress.update(200, 100, 4.5, 1234.0, force_line=True)
    progress.close()
    assert stream.getvalue() == "cell: 200/1,000 tokens (20.0%), loss 4.5000, 1,234 tok/s\n"
    silent = io.StringIO()
    Progress("cell", 1000, 0, enabled=False, tty=False, stream=silent).update(1, 1, 1.0, 1.0, force_line=True)
    assert silent.getvalue() == ""


def test_progress_shows_a_bar_on_a_terminal():
    stream = io.StringIO()
    progress = Progress("cell", 1000, 0, tty=True, stream=stream)
    progress.update(500, 500, 4.25, 99.0, force_line=True)
    progress.close()
    out = stream.getvalue()
    assert "\r" in out and "500/1.00k" in out and "loss=4.250" in out
    assert "tokens (50.0%)" not in out  # no plain line besides the bar


# ---------------------------------------------------------------- checkpoint files

def test_atomic_save_and_safe_load_round_trip(tmp_path):
    path = tmp_path / "ckpt" / "256.pt"
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "tokens_seen": 256, "rows": [{"a": None}]}
    checkpoint.atomic_save(state, path)
    assert sorted(os.listdir(path.parent)) == ["256.pt"]  # no temporary left behind
    loaded = checkpoint.safe_load(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["rows"] == [{"a": None}]
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        checkpoint.safe_load(tmp_path / "missing.pt")


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    checkpoint.atomic_save({"rng": checkpoint.rng_state()}, tmp_path / "0.pt")
    draws = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(checkpoint.safe_load(tmp_path / "0.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_prune_keeps_the_newest(tmp_path):
    for tokens in (0, 256, 512, 1024):
        (tmp_path / f"{tokens}.pt").write_bytes(b"x")
    (tmp_path / ".1024.pt.abc.tmp").write_bytes(b"x")
    checkpoint.prune(tmp_path, 2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["512.pt", "1024.pt"]



def test_a_job_reads_its_settings_json_as_written_and_does_not_validate_it_again(tmp_path):
    """Validated once (when the workflow wrote settings.json): a job checks its structure, imports no jsonschema."""
    import argparse
    import json
    import subprocess
    import sys

    from conftest import env_with_src

    from qkrank.cell_args import settings_from_args

    settings = _settings()
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    code = ("import sys, json, argparse; from qkrank.cell_args import settings_from_args; "
            "s = settings_from_args(argparse.Namespace(settings=sys.argv[1])); "
            "print(type(s).__name__, s.plain == json.load(open(sys.argv[1])), 'jsonschema' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env_with_src(), capture_output=True, text=True)
    assert out.stdout.split() == ["CellSettings", "True", "False"], out.stderr
    path.write_text(json.dumps({**settings, "train": {**settings["train"], "lr": 0.1}}))
    with pytest.raises(qconfig.ConfigError, match=r"settings\.json: settings field 'settings\.train\.lr': unknown key"):
        settings_from_args(argparse.Namespace(settings=str(path)))


def test_compile_switch_trains_through_torch_compile_on_cpu_with_the_eager_losses(micro_data, tmp_path):
    """``train.compile: true`` is obeyed on a CPU: the cell trains through torch.compile (inductor), says so in
    its log and manifest, and reaches the losses and weights of the eager run up to fp32 rounding."""
    import json

    from qkrank.train import train_cell

    runs = {}
    for compiled in (False, True):
        cfg = _micro({"compile": compiled, "bf16": False})
        loaded = qconfig.load(cfg)
        settings = qconfig.cell_settings(loaded, qconfig.cells(loaded)[0])
        runs[compiled] = tmp_path / f"compile_{compiled}"
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        train_cell(settings, micro_data, runs[compiled])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled, f"compile: {compiled}, but dynamo captured {graphs} graphs"
    manifests = {c: json.loads((run / "train.json").read_text()) for c, run in runs.items()}
    assert manifests[True]["runtime"]["compile"] is True and manifests[False]["runtime"]["compile"] is False
    losses = {c: np.genfromtxt(run / "metrics.csv", delimiter=",", names=True)["train_loss"] for c, run in runs.items()}
    assert len(losses[True]) == len(losses[False]) == 9, "a row at 0 tokens, then one per step of the micro cell"
    np.testing.assert_allclose(losses[True][1:], losses[False][1:], rtol=1e-4)
    initial = checkpoint.safe_load(runs[False] / "snapshots" / "0.pt")["model"]
    eager, compiled = (checkpoint.safe_load(runs[c] / "snapshots" / "2048.pt")["model"] for c in (False, True))
    for name in eager:  # Muon orthogonalises in bf16: rounding differences stay small against training's change
        assert (compiled[name] - eager[name]).norm() <= 0.02 * (eager[name] - initial[name]).norm(), name
