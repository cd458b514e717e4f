"""Probe one snapshot: q and k at every site and head on a fixed held-out batch → one HDF5 file.

``python -m qkrank.probe --run-dir results/runs/<cell> --tokens 81920 --data results/data --out X.h5``
Layout (docs/hdf5.md): ``layers/{i}/{q|k}/{proj|normed|roped}/{sv,pr,pr_cov,erank,stable_rank[,act]}``
and ``layers/{i}/gamma_{q|k}``; root attributes identify the cell, checkpoint and probe batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from qkrank import __version__, checkpoint, runtime
from qkrank import config as qconfig
from qkrank.atomic import atomic_path
from qkrank.data import DataError, TokenShards, sha256_file
from qkrank.model import GPT, SITES, TENSORS, ModelConfig
from qkrank.rank import SpectrumAccumulator, all_metrics

SCHEMA_VERSION = 1


class ProbeError(RuntimeError):
    pass


def probe_windows(shards: TokenShards, probe_cfg: dict, seq_len: int) -> np.ndarray:
    """The probe batch: identical tokens for every checkpoint, mode and seed of a study."""
    return shards.fixed_windows("val", probe_cfg["n_sequences"], probe_cfg["seq_len"] or seq_len)


def batch_hash(windows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()[:16]


def load_snapshot(run_dir: Path, tokens: int) -> dict:
    """A snapshot verified against the run manifest's sha256 (a corrupt file is never trusted)."""
    manifest_path = run_dir / "train.json"
    if not manifest_path.exists():
        raise ProbeError(f"{manifest_path} is missing: the cell has not finished training")
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["snapshots"].get(str(tokens))
    if entry is None:
        raise ProbeError(
            f"{manifest_path}: no snapshot at {tokens} tokens; have {sorted(map(int, manifest['snapshots']))}"
        )
    path = run_dir / entry["path"]
    if not path.exists() or sha256_file(path) != entry["sha256"]:
        raise ProbeError(
            f"{path}: missing or its sha256 differs from {manifest_path}; the snapshot is corrupt — "
            f"delete {manifest_path} and rerun the workflow to retrain this cell"
        )
    return checkpoint.safe_load(path)


@torch.no_grad()
def measure(model: GPT, windows: np.ndarray, chunk: int, device: torch.device, keep_activations: bool):
    """Per site name: (SpectrumAccumulator, activations (heads, n, d) float16 or None)."""
    model.eval()
    accs: dict[str, SpectrumAccumulator] = {}
    acts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(windows), chunk):
        x = torch.from_numpy(windows[i : i + chunk]).to(device)
        with model.capture() as captured:
            model(x)
        for name, value in captured.items():
            # (B, heads, T, d) → (heads, B·T, d): every token of the chunk is one vector per head.
            per_head = value.transpose(0, 1).reshape(value.shape[1], -1, value.shape[-1])
            accs.setdefault(name, SpectrumAccumulator()).add(per_head)
            if keep_activations:
                acts.setdefault(name, []).append(per_head.to("cpu", torch.float16).numpy())
    return {name: (acc, np.concatenate(acts[name], axis=1) if keep_activations else None) for name, acc in accs.items()}


def write_h5(path: Path, attrs: dict, results: dict, gammas: dict[str, torch.Tensor], n_layers: int) -> None:
    """Write the probe file to a temporary name, then rename: a killed job leaves no partial file."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for layer in range(n_layers):
            for tensor in TENSORS:
                for site in SITES:
                    acc, act = results[f"layer.{layer}/{tensor}/{site}"]
                    group = f.create_group(f"layers/{layer}/{tensor}/{site}")
                    sv, eig = acc.singular_values(), acc.covariance_eigenvalues()
                    group.create_dataset("sv", data=sv)
                    group.create_dataset("eig_cov", data=eig)
                    for metric, values in all_metrics(sv, eig).items():
                        group.create_dataset(metric, data=values)
                    if act is not None:
                        group.create_dataset(
                            "act", data=act, compression="gzip", compression_opts=4, chunks=(1,) + act.shape[1:]
                        )
            for tensor in TENSORS:
                gamma = gammas.get(f"layer.{layer}/gamma_{tensor}")
                if gamma is not None:
                    f.create_dataset(f"layers/{layer}/gamma_{tensor}", data=gamma.cpu().double().numpy())
        f.attrs["complete"] = True  # written last: a file without it is never trusted


def probe_snapshot(settings: dict, data_dir: Path, run_dir: Path, tokens: int, out: Path) -> None:
    snap = load_snapshot(Path(run_dir), tokens)
    model_cfg = ModelConfig(**snap["model_config"])
    if model_cfg.norm_mode != settings["cell"]["mode"]:
        raise ProbeError(f"{run_dir}: snapshot mode {model_cfg.norm_mode!r} != cell mode {settings['cell']['mode']!r}")
    probe_cfg = settings["probe"]
    device = runtime.resolve_device(probe_cfg["device"])
    torch.set_num_threads(settings["resources"]["probe"]["cpus"])
    model = GPT(model_cfg)
    model.load_state_dict(snap["model"])
    model.to(device)
    shards = TokenShards(data_dir)
    windows = probe_windows(shards, probe_cfg, settings["train"]["seq_len"])
    results = measure(model, windows, probe_cfg["chunk_sequences"], device, probe_cfg["save_activations"])
    cell = settings["cell"]
    attrs = {
        "scale": cell["scale"],
        "mode": cell["mode"],
        "optimizer": cell["optimizer"],
        "seed": cell["seed"],
        "cell": cell["id"],
        "tokens_seen": int(snap["tokens_seen"]),
        "step": int(snap["step"]),
        "config_hash": snap["config_hash"],
        "probe_batch_hash": batch_hash(windows),
        "n_probe_tokens": int(windows.size),
        "qkrank_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "n_layers": model_cfg.n_layers,
        "n_heads": model_cfg.n_heads,
        "n_kv_heads": model_cfg.n_kv_heads,
        "head_dim": model_cfg.head_dim,
    }
    if snap.get("val_loss") is not None:
        attrs["val_loss"] = float(snap["val_loss"])
    write_h5(Path(out), attrs, results, model.gammas(), model_cfg.n_layers)


def main(argv=None) -> None:
    from qkrank.train import add_settings_args, settings_from_args

    parser = argparse.ArgumentParser(description="Probe one snapshot of a trained cell into an HDF5 file.")
    add_settings_args(parser)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--run-dir", required=True, type=Path, help="the cell's run directory (train.json)")
    parser.add_argument("--tokens", required=True, type=int, help="tokens seen of the snapshot to probe")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if not args.settings and not args.cell:
        parser.error("give --cell (with --config) or --settings")
    try:
        probe_snapshot(settings_from_args(args), args.data, args.run_dir, args.tokens, args.out)
    except (qconfig.ConfigError, checkpoint.CheckpointError, ProbeError, DataError) as e:
        sys.exit(f"qkrank.probe: error: {e}")


if __name__ == "__main__":
    main()
