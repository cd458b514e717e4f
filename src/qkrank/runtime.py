"""Where and how a job computes: device, threads, precision and GPU switches (bf16, compile, TF32), DDP setup."""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from qkrank.settings import TrainSettings


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    compile: bool
    tf32: bool
    fused: bool = False
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        """The process-group backend: NCCL on GPU, gloo on CPU; None for a single process."""
        if self.world_size == 1:
            return None
        return "nccl" if self.device.type == "cuda" else "gloo"

    def autocast(self):
        """bf16 autocast when switched on (on the job's device); a no-op context otherwise.

        Only the forward's matmuls run in bf16: weights, gradients, optimizer states stay float32 (probes,
        which never enter this context, compute their spectra in float64)."""
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> dict:
        return {"device": str(self.device), "bf16": self.bf16, "compile": self.compile, "tf32": self.tf32,
                "fused": self.fused, "world_size": self.world_size, "backend": self.backend}


def resolve_switch(value, available: bool) -> bool:
    """Config switch ``auto``/true/false → bool; ``auto`` means on when the feature is ``available``."""
    if value == "auto":
        return available
    if isinstance(value, bool):
        return value
    raise ValueError(f"switch value {value!r} is not one of 'auto', true, false")


# CPU flags of native bf16 dot products (AVX512-BF16 VDPBF16PS, AMX tiles): there oneDNN runs bf16 matmuls at
# 2-4x the fp32 rate. Elsewhere bf16 is emulated through fp32 and only adds conversions.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo text (empty if it has none)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where this CPU computes bf16 dot products natively (flags in /proc/cpuinfo, else torch's view)."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool(cpu_flags(f.read()) & set(CPU_BF16_FLAGS))
    except OSError:  # not Linux: trust the kernel set torch picked (AMX implies native bf16)
        return "AMX" in torch.backends.cpu.get_cpu_capability()


def resolve_switches(train: TrainSettings, cuda: bool, bf16_native: bool) -> dict[str, bool]:
    """The precision and GPU switches this job uses, from config and what the hardware offers.

    ``auto`` turns bf16 autocast on where the job's device has native bf16 (a CUDA GPU with bf16 tensor
    cores, a CPU with AVX512-BF16 or AMX); ``torch.compile``, TF32 and the fused kernels (fused AdamW, the
    chunked head loss) only on CUDA: on this project's CPU the fused loss gave no speed (12.4k against 12.7k
    tokens/s, tiny, bf16) and its memory saving matters little. An explicit ``true`` is obeyed on CPU too for
    bf16, compile and fused; TF32 exists only on CUDA, so it is off on CPU whatever the config says.
    """
    return {"bf16": resolve_switch(train.bf16, bf16_native),
            "compile": resolve_switch(train.compile, cuda),
            "tf32": resolve_switch(train.tf32, cuda) and cuda,
            "fused": resolve_switch(train.fused, cuda)}


def resolve_device(choice: str, local_rank: int = 0, cuda_available: bool | None = None) -> torch.device:
    """``auto`` → this rank's GPU when CUDA is present, else CPU; ``cuda`` without CUDA is an error."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if choice == "cuda" and not cuda_available:
        raise RuntimeError("config field 'train.device': 'cuda' requested but CUDA is not available; "
                           "use 'auto' or 'cpu'")
    if choice == "cuda" or (choice == "auto" and cuda_available):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and convolutions (CUDA only; harmless elsewhere)."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def init(train: TrainSettings, job_cpus: int = 1) -> Runtime:
    """Set up this process: DDP when launched by torchrun (WORLD_SIZE > 1), threads, TF32.

    Threads: ``train.threads`` if set, else the job's CPUs shared among its processes.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(train.device, local_rank)
    cuda = device.type == "cuda"
    torch.set_num_threads(train.threads or max(1, job_cpus // world_size))
    if cuda:
        torch.cuda.set_device(device)
    bf16_native = torch.cuda.is_bf16_supported(including_emulation=False) if cuda else cpu_has_native_bf16()
    switches = resolve_switches(train, cuda, bf16_native)
    rt = Runtime(device=device, rank=rank, world_size=world_size, **switches)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(rt.backend)
    if cuda:
        set_tf32(rt.tf32)
    return rt


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM sends before the time limit


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary; restores handlers on exit."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.received = signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def all_reduce_sum(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The sum over processes (a copy); the value itself for a single process."""
    if runtime.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    return all_reduce_sum(value, runtime) / runtime.world_size


def barrier(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def imports_done(*modules: str) -> None:
    """In a job that started with the garbage collector off (``gc.disable()`` before its imports): import
    ``modules`` too, freeze what the imports made, so collections never scan it, and collect from here on."""
    for name in modules:
        importlib.import_module(name)
    gc.freeze()
    gc.enable()


def exit_finished_job() -> NoReturn:
    """End a job whose outputs are all in place (written, fsynced, renamed) without the interpreter's teardown.

    Finalising the modules and objects of a process that imported torch took 0.5 s of a 2 s probe job here,
    and there is nothing left for it to do: streams are flushed here, files are closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
