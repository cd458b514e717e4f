"""Train one cell: ``python -m qkrank.train --config config.yaml --cell tiny/learned/muon/seed0 ...``.

The loop only: data batches, forward/backward with accumulation, clipping, schedule, validation,
snapshots and resume checkpoints at configured token counts. A killed job restarts from its last
complete resume checkpoint; SIGTERM/SIGUSR1 (what SLURM sends before the time limit) write one and exit
with status 75 so the job is retried rather than marked done.
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
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from qkrank import checkpoint, runtime
from qkrank import config as qconfig
from qkrank.atomic import atomic_write_text
from qkrank.data import TokenShards, sha256_file
from qkrank.metrics import write_csv
from qkrank.model import GPT, ModelConfig
from qkrank.optim import build_optimizers, lr_factor, set_lr

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, run again to continue
# Fault-injection hooks for the test suite (documented in docs/testing.md).
FAULT_NAN_AT_STEP = "QKRANK_FAULT_NAN_AT_STEP"
FAULT_KILL_AT_STEP = "QKRANK_FAULT_KILL_AT_STEP"


class TrainingDiverged(RuntimeError):
    pass


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


def _validation_loss(model, windows: np.ndarray, micro_batch: int, rt: runtime.Runtime) -> float:
    """Mean loss over fixed held-out windows; each process takes every world_size-th chunk."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    with torch.no_grad():
        for i in range(rt.rank * micro_batch, len(windows), micro_batch * rt.world_size):
            chunk = torch.from_numpy(windows[i:i + micro_batch]).to(rt.device)
            with rt.autocast():
                _, loss = model(chunk[:, :-1], chunk[:, 1:])
            total += torch.tensor([loss.item() * len(chunk), len(chunk)], dtype=torch.float64, device=rt.device)
    if rt.world_size > 1:
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


class _StopSignal:
    """Remembers SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum


def train_cell(settings: dict, data_dir: Path, run_dir: Path) -> dict:
    """Train (or resume) one cell; returns the run manifest written to ``run_dir/train.json``."""
    train_cfg = settings["train"]
    seed = settings["cell"]["seed"]
    threads = train_cfg["threads"] or settings["resources"]["train"]["cpus"]
    rt = runtime.init(train_cfg, threads)
    run_dir = Path(run_dir)
    snap_dir, resume_dir = run_dir / "snapshots", run_dir / "resume"
    identity = qconfig.training_identity(settings)
    cfg_hash = qconfig.config_hash(identity)
    stop = _StopSignal()

    shards = TokenShards(data_dir)
    model = build_model(settings, shards.vocab_size).to(rt.device)
    optimizers = build_optimizers(model, settings["cell"]["optimizer"], settings["optim"])
    seq_len, micro, accum = train_cfg["seq_len"], train_cfg["micro_batch"], train_cfg["grad_accum"]
    per_rank = micro // rt.world_size
    step_tokens = qconfig.tokens_per_step(train_cfg)
    total_tokens = train_cfg["total_tokens"]
    snapshot_marks = set(qconfig.checkpoint_tokens(settings))
    n_windows = shards.n_windows("train", seq_len + 1)
    val_windows = shards.fixed_windows("val", max(1, train_cfg["val_tokens"] // seq_len), seq_len + 1)

    step, tokens_seen, rows = 0, 0, []
    state = checkpoint.latest_valid(resume_dir, cfg_hash)
    if state is not None:
        model.load_state_dict(state["model"])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        checkpoint.set_rng_state(state["rng"])
        step, tokens_seen, rows = state["step"], state["tokens_seen"], state["metrics"]
        if rt.is_main:
            print(f"resumed {settings['cell']['id']} from {state['path']} at {tokens_seen:,} tokens", flush=True)
        del state

    train_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) \
        if rt.world_size > 1 else model
    forward = torch.compile(train_model) if rt.compile else train_model

    def save(tokens: int, val_loss: float | None) -> None:
        if not rt.is_main:
            return
        meta = {"tokens_seen": tokens, "step": step, "config_hash": cfg_hash, "cell": settings["cell"],
                "model_config": model.cfg.to_dict(), "data_hash": shards.content_hash}
        if tokens in snapshot_marks:
            checkpoint.atomic_save({"model": model.state_dict(), "val_loss": val_loss, **meta},
                                   snap_dir / f"{tokens}.pt")
        checkpoint.atomic_save({
            "model": model.state_dict(),
            "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
            "rng": checkpoint.rng_state(), "metrics": rows, **meta}, resume_dir / f"{tokens}.pt")
        checkpoint.prune(resume_dir, train_cfg["keep_resume_checkpoints"])

    if tokens_seen == 0:
        val0 = _validation_loss(model, val_windows, micro, rt)
        rows = [{"tokens_seen": 0, "step": 0, "val_loss": val0}]
        save(0, val0)

    nan_step = int(os.environ.get(FAULT_NAN_AT_STEP, -1))
    kill_step = int(os.environ.get(FAULT_KILL_AT_STEP, -1))
    bar = tqdm(total=total_tokens, initial=tokens_seen, unit="tok", unit_scale=True, dynamic_ncols=True,
               desc=settings["cell"]["id"], disable=not (rt.is_main and sys.stderr.isatty()))
    t_start, t_last_print = time.perf_counter(), time.perf_counter()
    model.train()
    while tokens_seen < total_tokens:
        t0 = time.perf_counter()
        starts = batch_starts(seed, step, n_windows, micro * accum).reshape(accum, micro)
        loss_sum = torch.zeros((), device=rt.device)
        for m in range(accum):
            rows_np = shards.windows("train", starts[m, rt.rank * per_rank:(rt.rank + 1) * per_rank], seq_len + 1)
            batch = torch.from_numpy(rows_np).to(rt.device, non_blocking=True)
            sync = m == accum - 1 or rt.world_size == 1
            ctx = train_model.no_sync() if not sync else contextlib.nullcontext()
            with ctx, rt.autocast():
                _, loss = forward(batch[:, :-1], batch[:, 1:])
            (loss / accum).backward()
            loss_sum += loss.detach()
        train_loss = runtime.all_reduce_mean(loss_sum / accum, rt).item()
        if step == nan_step:
            train_loss = float("nan")
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"{settings['cell']['id']}: non-finite training loss ({train_loss}) at step "
                                   f"{step} (tokens seen {tokens_seen:,}); last good checkpoint kept in {resume_dir}")
        clip = train_cfg["grad_clip"]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf")).item()
        lrs = set_lr(optimizers, lr_factor(tokens_seen, total_tokens, settings["optim"]["schedule"]))
        for opt in optimizers.values():
            opt.step()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens
        dt = time.perf_counter() - t0
        val_loss = None
        if tokens_seen % train_cfg["val_every_tokens"] == 0 or tokens_seen in snapshot_marks:
            val_loss = _validation_loss(model, val_windows, micro, rt)
        if step % train_cfg["log_every_steps"] == 0 or val_loss is not None:
            rows.append({"tokens_seen": tokens_seen, "step": step, "train_loss": train_loss, "val_loss": val_loss,
                         "lr_muon": lrs.get("muon"), "lr_adamw": lrs.get("adamw"), "grad_norm": grad_norm,
                         "tokens_per_s": round(step_tokens / dt, 1),
                         "wall_s": round(time.perf_counter() - t_start, 3)})
        bar.update(step_tokens)
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{step_tokens / dt:,.0f}")
        if rt.is_main and bar.disable and time.perf_counter() - t_last_print > 30:
            print(f"{settings['cell']['id']}: {tokens_seen:,}/{total_tokens:,} tokens, loss {train_loss:.4f}, "
                  f"{step_tokens / dt:,.0f} tok/s", flush=True)
            t_last_print = time.perf_counter()
        if tokens_seen in snapshot_marks:
            save(tokens_seen, val_loss)
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if stop.received is not None and tokens_seen < total_tokens:
            save(tokens_seen, val_loss)
            runtime.barrier(rt)
            print(f"received signal {stop.received}: checkpointed at {tokens_seen:,} tokens, exiting "
                  f"{EXIT_PREEMPTED} so the job is retried", flush=True)
            sys.exit(EXIT_PREEMPTED)
    bar.close()

    manifest = {}
    if rt.is_main:
        write_csv(rows, run_dir / "metrics.csv")
        snapshots = {str(t): {"path": f"snapshots/{t}.pt", "sha256": sha256_file(snap_dir / f"{t}.pt")}
                     for t in sorted(snapshot_marks)}
        manifest = {"cell": settings["cell"], "config_hash": cfg_hash, "data_hash": shards.content_hash,
                    "tokens_seen": tokens_seen, "steps": step, "snapshots": snapshots,
                    "n_params": model.num_params()}
        atomic_write_text(run_dir / "train.json", json.dumps(manifest, indent=2) + "\n")
        # Done: a forced rerun must retrain from zero, not resume the finished state.
        shutil.rmtree(resume_dir, ignore_errors=True)
    runtime.barrier(rt)
    return manifest


def settings_from_args(args) -> dict:
    if args.settings:
        raw = qconfig.load_json(args.settings)
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
    except (qconfig.ConfigError, checkpoint.CheckpointError, TrainingDiverged) as e:
        sys.exit(f"qkrank.train: error: {e}")
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
