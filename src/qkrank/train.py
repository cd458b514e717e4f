"""Train one cell: ``python -m qkrank.train --config config.yaml --cell tiny/learned/muon/seed0 ...``.

The loop only: data batches, forward/backward with accumulation, clipping, schedule, validation,
snapshots and resume checkpoints at configured token counts. A killed job restarts from its last
complete resume checkpoint; SIGTERM/SIGUSR1 (what SLURM sends before the time limit) write one and exit
with status 75 so the job is retried rather than marked done. docs/training.md explains all of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from qkrank import checkpoint, runtime
from qkrank import config as qconfig
from qkrank.atomic import atomic_write_text
from qkrank.data import DataError, TokenShards, sha256_file
from qkrank.metrics import Progress, write_csv
from qkrank.model import GPT, ModelConfig
from qkrank.optim import build_optimizers, lr_factor, set_lr

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, run again to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Fault-injection hooks for the tests (docs/training.md). N is the optimizer step as in metrics.csv's
# `step` column: NaN replaces step N's loss; kill -9 hits right after step N (and its checkpoint, if any).
FAULT_NAN_AT_STEP = "QKRANK_FAULT_NAN_AT_STEP"
FAULT_KILL_AT_STEP = "QKRANK_FAULT_KILL_AT_STEP"


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf; the last good resume checkpoint is left in place."""


class Preempted(Exception):
    """A stop signal arrived; a resume checkpoint was written and the job should be run again."""


def build_model(settings: dict, vocab_size: int | None = None) -> GPT:
    """The cell's model, initialised from its seed (identical across norm modes for one seed)."""
    fields = {k: v for k, v in settings["model"].items() if k != "preset"}
    cfg = ModelConfig.from_preset(settings["model"]["preset"], norm_mode=settings["cell"]["mode"], **fields)
    if vocab_size is not None and vocab_size > cfg.vocab_size:
        raise qconfig.ConfigError(
            f"config field 'scales.{settings['cell']['scale']}.model.vocab_size': the model's vocabulary "
            f"({cfg.vocab_size}) is smaller than the tokenizer's ({vocab_size}); set it to at least {vocab_size}")
    torch.manual_seed(settings["cell"]["seed"])
    return GPT(cfg)


def batch_starts(seed: int, step: int, n_windows: int, rows: int) -> np.ndarray:
    """Window starts of one optimizer step: a pure function of (seed, step), so resume needs no data state."""
    return np.random.default_rng([seed, step]).integers(0, n_windows, size=rows)


def validation_loss(model, windows: np.ndarray, micro_batch: int, rt: runtime.Runtime) -> float:
    """Mean loss over fixed held-out windows; each process takes every world_size-th chunk."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    with torch.no_grad():
        for i in range(rt.rank * micro_batch, len(windows), micro_batch * rt.world_size):
            chunk = torch.from_numpy(windows[i:i + micro_batch]).to(rt.device)
            with rt.autocast():
                _, loss = model(chunk[:, :-1], chunk[:, 1:])
            total[0] += loss.double() * len(chunk)
            total[1] += len(chunk)
    total = runtime.all_reduce_sum(total, rt)
    model.train()
    return (total[0] / total[1]).item()


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


def _env_step(name: str) -> int:
    value = os.environ.get(name, "")
    if value and not value.lstrip("-").isdigit():
        raise qconfig.ConfigError(f"environment variable {name}={value!r} is not an integer step")
    return int(value) if value else -1


def _forward_backward(forward, train_model, shards: TokenShards, starts: np.ndarray, rt: runtime.Runtime,
                      seq_len: int) -> torch.Tensor:
    """Accumulate one optimizer step's gradients over micro-batches; returns this process's mean loss.

    ``starts`` is (grad_accum, micro_batch): the global batch. Process r takes the r-th slice of each
    micro-batch, so the global batch is the same for any number of processes.
    """
    accum, micro = starts.shape
    per_rank = micro // rt.world_size
    loss_sum = torch.zeros((), device=rt.device)
    for m in range(accum):
        mine = starts[m, rt.rank * per_rank:(rt.rank + 1) * per_rank]
        batch = torch.from_numpy(shards.windows("train", mine, seq_len + 1)).to(rt.device, non_blocking=True)
        # DDP all-reduces gradients once per optimizer step: on its last micro-batch.
        skip_sync = rt.world_size > 1 and m < accum - 1
        with train_model.no_sync() if skip_sync else contextlib.nullcontext(), rt.autocast():
            _, loss = forward(batch[:, :-1], batch[:, 1:])
        (loss / accum).backward()
        loss_sum += loss.detach()
    return loss_sum / accum


def _same_on_all_ranks(value: int, rt: runtime.Runtime) -> bool:
    both = torch.tensor([value, -value], dtype=torch.float64, device=rt.device)
    if rt.world_size > 1:
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    return both[0].item() == -both[1].item()


def train_cell(settings: dict, data_dir: Path, run_dir: Path) -> dict:
    """Train (or resume) one cell; returns the run manifest written to ``run_dir/train.json``."""
    rt = runtime.init(settings["train"], settings["resources"]["train"]["cpus"])
    with StopSignal() as stop:
        return _train(settings, Path(data_dir), Path(run_dir), rt, stop)


def _train(settings: dict, data_dir: Path, run_dir: Path, rt: runtime.Runtime, stop: StopSignal) -> dict:
    train_cfg, cell, seed = settings["train"], settings["cell"], settings["cell"]["seed"]
    snap_dir, resume_dir = run_dir / "snapshots", run_dir / "resume"
    cfg_hash = qconfig.config_hash(qconfig.training_identity(settings))
    seq_len, micro, accum = train_cfg["seq_len"], train_cfg["micro_batch"], train_cfg["grad_accum"]
    if micro % rt.world_size:
        raise qconfig.ConfigError(f"config field 'scales.{cell['scale']}.train.micro_batch': {micro} is not "
                                  f"divisible by the {rt.world_size} processes this job was launched with")
    step_tokens, total_tokens = qconfig.tokens_per_step(train_cfg), train_cfg["total_tokens"]
    snapshot_marks = set(qconfig.checkpoint_tokens(settings))

    shards = TokenShards(data_dir)
    model = build_model(settings, shards.vocab_size).to(rt.device)
    optimizers = build_optimizers(model, cell["optimizer"], settings["optim"])
    n_windows = shards.n_windows("train", seq_len + 1)
    val_windows = shards.fixed_windows("val", max(1, train_cfg["val_tokens"] // seq_len), seq_len + 1)

    step, tokens_seen, rows, wall_before = 0, 0, [], 0.0
    state = checkpoint.latest_valid(resume_dir, cfg_hash)
    resumed_from = None
    if state is not None:
        resumed_from = state["path"]
        if state["data_hash"] != shards.content_hash:
            raise checkpoint.CheckpointError(
                f"{resumed_from}: written for data {state['data_hash']}, but {data_dir} now holds data "
                f"{shards.content_hash}; delete {resume_dir} to start the cell afresh on the new data")
        checkpoint.restore(state, model, optimizers)
        step, tokens_seen, rows, wall_before = state["step"], state["tokens_seen"], state["metrics"], state["wall_s"]
        del state
    if not _same_on_all_ranks(tokens_seen, rt):
        raise checkpoint.CheckpointError(f"{resume_dir}: processes found different resume points; is the "
                                         f"run directory on a file system all of them see alike?")

    train_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) \
        if rt.world_size > 1 else model
    forward = torch.compile(train_model) if rt.compile else train_model
    progress = Progress(cell["id"], total_tokens, tokens_seen, enabled=rt.is_main)
    progress.line(f"{'resumed from ' + resumed_from if resumed_from else 'starting'} at {tokens_seen:,} tokens; "
                  f"{step_tokens:,} tokens/step; {json.dumps(rt.describe())}")
    t_start = time.perf_counter()

    def save(val_loss: float | None) -> None:
        """Snapshot (at a probe mark) and resume checkpoint of the state after ``step``; rank 0 writes."""
        if not rt.is_main:
            return
        meta = {"tokens_seen": tokens_seen, "step": step, "config_hash": cfg_hash, "cell": cell,
                "model_config": model.cfg.to_dict(), "data_hash": shards.content_hash}
        if tokens_seen in snapshot_marks:
            checkpoint.atomic_save({"model": model.state_dict(), "val_loss": val_loss, **meta},
                                   snap_dir / f"{tokens_seen}.pt")
        resume_meta = {**meta, "wall_s": wall_before + time.perf_counter() - t_start,
                       # Batches are a pure function of (seed, step): the next step index is the data position.
                       "data_position": {"seed": seed, "next_step": step, "rows_per_step": micro * accum},
                       "schedule": {**settings["optim"]["schedule"],
                                    "next_lr_factor": lr_factor(tokens_seen + step_tokens, total_tokens,
                                                                settings["optim"]["schedule"])}}
        checkpoint.atomic_save(checkpoint.resume_state(model, optimizers, resume_meta, rows),
                               resume_dir / f"{tokens_seen}.pt")
        checkpoint.prune(resume_dir, train_cfg["keep_resume_checkpoints"])
        write_csv(rows, run_dir / "metrics.csv")  # readable while the cell runs

    if tokens_seen == 0:
        val0 = validation_loss(model, val_windows, micro, rt)
        rows = [{"tokens_seen": 0, "step": 0, "val_loss": val0, "wall_s": 0.0}]
        save(val0)

    nan_step, kill_step = _env_step(FAULT_NAN_AT_STEP), _env_step(FAULT_KILL_AT_STEP)
    model.train()
    while tokens_seen < total_tokens:
        t0 = time.perf_counter()
        starts = batch_starts(seed, step, n_windows, micro * accum).reshape(accum, micro)
        local_loss = _forward_backward(forward, train_model, shards, starts, rt, seq_len)
        # One collective per step: the mean loss, and whether any process was asked to stop.
        reduced = runtime.all_reduce_sum(
            torch.stack([local_loss.float(), torch.tensor(float(stop.received is not None), device=rt.device)]), rt)
        train_loss, stop_requested = (reduced[0] / rt.world_size).item(), reduced[1].item() > 0
        if step + 1 == nan_step:
            train_loss = float("nan")
        clip = train_cfg["grad_clip"]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf")).item()
        for name, value in (("training loss", train_loss), ("gradient norm", grad_norm)):
            if not math.isfinite(value):
                kept = checkpoint.list_checkpoints(resume_dir)
                raise TrainingDiverged(
                    f"{cell['id']}: {name} is {value} at step {step + 1} (tokens seen {tokens_seen:,}); "
                    f"stopped before the optimizer update. Last good checkpoint: "
                    f"{kept[-1] if kept else 'none'} (resume/ is left as it is)")
        lrs = set_lr(optimizers, lr_factor(tokens_seen + step_tokens, total_tokens, settings["optim"]["schedule"]))
        for opt in optimizers.values():
            opt.step()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens
        tokens_per_s = step_tokens / (time.perf_counter() - t0)
        val_loss = None
        if tokens_seen % train_cfg["val_every_tokens"] == 0 or tokens_seen in snapshot_marks:
            val_loss = validation_loss(model, val_windows, micro, rt)
        if step % train_cfg["log_every_steps"] == 0 or val_loss is not None:
            rows.append({"tokens_seen": tokens_seen, "step": step, "train_loss": train_loss, "val_loss": val_loss,
                         "lr_muon": lrs.get("muon"), "lr_adamw": lrs.get("adamw"), "grad_norm": grad_norm,
                         "tokens_per_s": round(tokens_per_s, 1),
                         "wall_s": round(wall_before + time.perf_counter() - t_start, 3)})
        progress.update(tokens_seen, step_tokens, train_loss, tokens_per_s, force_line=tokens_seen in snapshot_marks)
        if tokens_seen in snapshot_marks:
            save(val_loss)
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if stop_requested and tokens_seen < total_tokens:
            if tokens_seen not in snapshot_marks:
                save(val_loss)
            runtime.barrier(rt)
            progress.close()
            raise Preempted(f"{cell['id']}: stop signal received; resume checkpoint written at {tokens_seen:,} "
                            f"tokens (step {step}) in {resume_dir}")
    progress.close()

    manifest = {}
    if rt.is_main:
        write_csv(rows, run_dir / "metrics.csv")
        snapshots = {str(t): {"path": f"snapshots/{t}.pt", "sha256": sha256_file(snap_dir / f"{t}.pt")}
                     for t in sorted(snapshot_marks)}
        manifest = {"cell": cell, "config_hash": cfg_hash, "data_hash": shards.content_hash,
                    "tokens_seen": tokens_seen, "steps": step, "tokens_per_step": step_tokens,
                    "snapshots": snapshots, "n_params": model.num_params(), "runtime": rt.describe()}
        atomic_write_text(run_dir / "train.json", json.dumps(manifest, indent=2) + "\n")
        # Done: a forced rerun must retrain from zero, not resume the finished state.
        shutil.rmtree(resume_dir, ignore_errors=True)
    runtime.barrier(rt)
    return manifest


def settings_from_args(args) -> dict:
    if args.settings:
        raw = qconfig.load_cell_settings(args.settings)
        cell = qconfig.Cell.parse(raw["cell"]["id"])
        config = {"grid": {"scales": [cell.scale], "modes": [cell.mode], "optimizers": [cell.optimizer],
                           "seeds": [cell.seed]},
                  "data": raw["data"], "scales": {cell.scale: {k: raw[k] for k in
                                                               ("model", "train", "optim", "probe", "resources")}}}
        return qconfig.cell_settings(qconfig.load(config), cell)
    config = qconfig.load(args.config)
    return qconfig.cell_settings(config, qconfig.Cell.parse(args.cell))


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(qconfig.DEFAULT_CONFIG_PATH), help="study config YAML")
    parser.add_argument("--cell", help="cell id scale/mode/optimizer/seedN (with --config)")
    parser.add_argument("--settings", help="a cell's resolved settings.json (what the workflow passes)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train one cell of a qkrank study.")
    add_settings_args(parser)
    parser.add_argument("--data", required=True, type=Path, help="prepared data directory (manifest.json)")
    parser.add_argument("--out", required=True, type=Path, help="the cell's run directory")
    args = parser.parse_args(argv)
    if not args.settings and not args.cell:
        parser.error("give --cell (with --config) or --settings")
    try:
        settings = settings_from_args(args)
        train_cell(settings, args.data, args.out)
    except Preempted as e:
        print(f"qkrank.train: {e}; exiting {EXIT_PREEMPTED} so the job is run again", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    except (qconfig.ConfigError, checkpoint.CheckpointError, DataError, TrainingDiverged) as e:
        sys.exit(f"qkrank.train: error: {e}")
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
