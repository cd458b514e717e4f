"""One cell's training state (``CellRun``: what ``train.start_or_resume`` builds, ``train_step`` advances and
``save`` writes) and the fault-injection hooks of the tests (``Faults``)."""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qkrank import config as qconfig
from qkrank import runtime
from qkrank.data import TokenShards
from qkrank.metrics import Progress
from qkrank.model import GPT
from qkrank.settings import CellInfo, CellSettings, TrainSettings

# Fault-injection hooks for the tests (docs/training.md). N is the optimizer step as in metrics.csv's
# `step` column: NaN replaces step N's loss; kill -9 hits right after step N (and its checkpoint, if any).
FAULT_NAN_AT_STEP = "QKRANK_FAULT_NAN_AT_STEP"
FAULT_KILL_AT_STEP = "QKRANK_FAULT_KILL_AT_STEP"


def _env_step(name: str) -> int:
    value = os.environ.get(name, "")
    if value and not value.lstrip("-").isdigit():
        raise qconfig.ConfigError(f"environment variable {name}={value!r} is not an integer step")
    return int(value) if value else -1


@dataclass
class Faults:
    """The fault-injection hooks of the tests (docs/training.md); -1 = off."""

    nan_step: int = -1
    kill_step: int = -1

    @classmethod
    def from_env(cls) -> Faults:
        return cls(_env_step(FAULT_NAN_AT_STEP), _env_step(FAULT_KILL_AT_STEP))

    def loss(self, step: int, loss: float) -> float:
        return float("nan") if step == self.nan_step else loss

    def after_step(self, step: int) -> None:
        if step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class CellRun:
    """One cell's training state: what start_or_resume builds, train_step advances and save writes."""

    settings: CellSettings
    rt: runtime.Runtime
    run_dir: Path
    shards: TokenShards
    model: GPT
    optimizers: dict
    train_model: torch.nn.Module  # the model, or its DDP wrapper
    forward: object  # train_model, or its torch.compile'd version
    n_windows: int
    val_windows: np.ndarray
    cfg_hash: str
    step: int = 0
    tokens_seen: int = 0
    rows: list = field(default_factory=list)
    wall_before: float = 0.0  # training seconds before this process (from the resume checkpoint)
    resumed_from: str | None = None
    t_start: float = field(default_factory=time.perf_counter)
    progress: Progress | None = None
    until: int | None = None  # a segment's end (write only its snapshot); None = a whole run

    @property
    def cell(self) -> CellInfo:
        return self.settings.cell

    @property
    def train(self) -> TrainSettings:
        return self.settings.train

    @property
    def micro(self) -> int:
        return self.train.micro_batch

    @property
    def step_tokens(self) -> int:
        return self.train.tokens_per_step

    @property
    def total_tokens(self) -> int:
        return self.train.total_tokens

    @functools.cached_property
    def snapshot_marks(self) -> set[int]:
        return set(qconfig.checkpoint_tokens(self.settings.plain))

    @property
    def at_snapshot(self) -> bool:
        return self.tokens_seen in self.snapshot_marks

    @property
    def snap_dir(self) -> Path:
        return self.run_dir / "snapshots"

    @property
    def resume_dir(self) -> Path:
        return self.run_dir / "resume"

    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    def meta(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "step": self.step, "config_hash": self.cfg_hash,
                "cell": self.settings.plain["cell"],
                "model_config": self.model.cfg.to_dict(), "data_hash": self.shards.content_hash}


