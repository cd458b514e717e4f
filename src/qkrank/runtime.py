"""Where and how a job computes: device, threads, GPU switches (bf16, compile, TF32) and DDP setup."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    compile: bool
    tf32: bool
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16 autocast on CUDA when switched on; a no-op context otherwise."""
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_switch(value, cuda: bool) -> bool:
    """Config switch ``auto``/true/false → bool; ``auto`` means on when CUDA is present."""
    return cuda if value == "auto" else bool(value)


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available; use device: auto or cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(train_cfg: dict, threads: int | None = None) -> Runtime:
    """Set up this process: DDP when launched by torchrun (WORLD_SIZE > 1), threads, TF32."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(train_cfg["device"], local_rank)
    cuda = device.type == "cuda"
    if threads:
        torch.set_num_threads(threads)
    if world_size > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    tf32 = resolve_switch(train_cfg["tf32"], cuda)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return Runtime(device=device, bf16=resolve_switch(train_cfg["bf16"], cuda) and cuda,
                   compile=resolve_switch(train_cfg["compile"], cuda), tf32=tf32 and cuda,
                   rank=rank, world_size=world_size)


def all_reduce_mean(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= runtime.world_size
    return value


def barrier(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
