"""Probe one snapshot: q and k at every site and head on a fixed held-out batch → one HDF5 file.

``python -m qkrank.probe --settings runs/<cell>/settings.json --data results/data --run-dir runs/<cell>
--tokens 81920 --out runs/<cell>/probe/81920.h5``. Layout (docs/hdf5.md):
``layers/{i}/{q|k}/{proj|normed|roped}/{sv,eig_cov,pr,pr_cov,erank,stable_rank,pr_seq,pr_seq_each[,act]}``,
``layers/{i}/{q|k}/weight/{sv,eig_cov,pr,...}`` (W_Q / W_K per head) and ``layers/{i}/gamma_{q|k}``;
root attributes identify the cell, checkpoint and probe batch.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # A job process: cyclic collections while torch imports scan its ~10⁵ new objects again and again, a
    # fifth of a probe job's wall time; runtime.imports_done() turns them back on.
    gc.disable()

import argparse
import contextlib
import hashlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

from qkrank import __version__, checkpoint, layout, runtime, snapshots
from qkrank import config as qconfig
from qkrank.atomic import atomic_path
from qkrank.data import DataError, TokenShards, sha256_file
from qkrank.model import GPT, SITES, TENSORS, ModelConfig
from qkrank.provenance import hdf5_attributes
from qkrank.rank import SpectrumAccumulator, all_metrics, per_sequence_pr, weight_spectra
from qkrank.settings import CellSettings, ProbeSettings

SCHEMA_VERSION = layout.PROBE_SCHEMA_VERSION
# Below 16 × head_dim probe tokens per head a spectrum reflects sample size as well as the model: even for
# isotropic Gaussian vectors σ_min/σ_max ≈ (1 − √(d/n)) / (1 + √(d/n)), 0.6 at n = 16d instead of 1.
MIN_TOKENS_PER_HEAD_DIM = 16
FLOAT16_MAX = float(np.finfo(np.float16).max)
# probe.save_activations: auto keeps the raw vectors when they are small enough to archive with every
# checkpoint (tiny, 2,048 tokens: 9 MiB per file); 88m (≈ 200 MiB at 2,048 tokens) and 1.5b (≈ 9 GiB at
# 16,384) keep only spectra and metrics.
AUTO_ACTIVATION_BYTES = 64 * 2**20


class ProbeError(RuntimeError):
    """A snapshot, probe batch or probe file that cannot be used; the message names the path."""


class ProbeWarning(UserWarning):
    """A probe that runs but whose numbers deserve caution (small batch, float16 overflow in ``act``)."""


def probe_batch(shards: TokenShards, probe: ProbeSettings, train_seq_len: int) -> np.ndarray:
    """The probe batch, (n_sequences, seq_len) held-out tokens: identical for every checkpoint, mode and seed."""
    return shards.fixed_windows("val", probe.n_sequences, probe.seq_len or train_seq_len)


def batch_hash(windows: np.ndarray) -> str:
    """Short sha256 of the probe batch's token ids (int64, row-major)."""
    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()[:16]


def small_batch_message(n_tokens: int, head_dim: int) -> str | None:
    """Why a probe batch of ``n_tokens`` per head is too small for head_dim, or None if it is large enough."""
    needed = MIN_TOKENS_PER_HEAD_DIM * head_dim
    if n_tokens >= needed:
        return None
    return (f"probe batch has {n_tokens} tokens per head, fewer than {MIN_TOKENS_PER_HEAD_DIM} × head_dim = "
            f"{needed}: the spectra will partly reflect sample size; raise probe.n_sequences or probe.seq_len")


def activation_bytes(cfg: ModelConfig, n_tokens: int) -> int:
    """Size of every ``act`` dataset of one probe file, float16, before compression."""
    return cfg.n_layers * len(SITES) * (cfg.n_heads + cfg.n_kv_heads) * n_tokens * cfg.head_dim * 2


def saves_activations(choice, cfg: ModelConfig, n_tokens: int) -> bool:
    """probe.save_activations resolved: true/false as given; auto = at most AUTO_ACTIVATION_BYTES of ``act``."""
    if choice == "auto":
        return activation_bytes(cfg, n_tokens) <= AUTO_ACTIVATION_BYTES
    return bool(choice)


def load_snapshot(run_dir: Path, tokens: int) -> dict:
    """A snapshot verified against the sha256 its training recorded (a corrupt file is never trusted)."""
    run_dir = Path(run_dir)
    try:
        path, sha = snapshots.locate(run_dir, tokens)
    except snapshots.SnapshotError as e:
        raise ProbeError(str(e)) from None
    if not path.exists() or sha256_file(path) != sha:
        raise ProbeError(
            f"{path}: missing or its sha256 differs from the one training recorded ({run_dir / 'train.json'} or "
            f"{snapshots.stamp_path(run_dir, tokens)}); the snapshot is corrupt — delete {run_dir} and rerun "
            f"the workflow to retrain this cell"
        )
    return checkpoint.read_snapshot(path)


ChunkSink = Callable[[str, int, torch.Tensor], None]


@torch.no_grad()
def measure(model: GPT, windows: np.ndarray, chunk_sequences: int, device: torch.device,
            on_chunk: ChunkSink | None = None,
            per_sequence: dict[str, list[np.ndarray]] | None = None) -> dict[str, SpectrumAccumulator]:
    """Per site name, the spectrum of its vectors over the batch; ``on_chunk(site, first_token, vectors)``
    sees every chunk's (heads, tokens, d) vectors, tokens numbered sequence-major (row · seq_len + position).
    ``per_sequence``, if given, receives per site one (chunk sequences, heads) array of per-sequence PR per chunk."""
    model.eval()
    spectra: dict[str, SpectrumAccumulator] = {}
    seq_len = windows.shape[1]
    for first_row in range(0, len(windows), chunk_sequences):
        x = torch.from_numpy(np.ascontiguousarray(windows[first_row : first_row + chunk_sequences])).to(device)
        with model.capture() as captured:
            model.residual_stream(x)
        for name, value in captured.items():
            # (B, heads, T, d) → (heads, B·T, d): every token of the chunk is one vector per head.
            per_head = value.transpose(0, 1).reshape(value.shape[1], -1, value.shape[-1])
            spectra.setdefault(name, SpectrumAccumulator()).add(per_head)
            if per_sequence is not None:
                per_sequence.setdefault(name, []).append(per_sequence_pr(per_head, seq_len))
            if on_chunk is not None:
                on_chunk(name, first_row * seq_len, per_head)
    return spectra


class ActivationWriter:
    """Streams each site's raw vectors into ``layers/{i}/{t}/{s}/act`` (float16, gzip), chunk by chunk."""

    def __init__(self, f: h5py.File, cfg: ModelConfig, n_tokens: int, chunk_tokens: int):
        self.datasets: dict[str, h5py.Dataset] = {}
        self.overflowed: set[str] = set()
        for layer in range(cfg.n_layers):
            for tensor, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
                for site in SITES:
                    # gzip level 1: float16 activations shrink ~20% at any level, higher levels only cost time.
                    self.datasets[f"layer.{layer}/{tensor}/{site}"] = f.create_dataset(
                        f"layers/{layer}/{tensor}/{site}/act", shape=(heads, n_tokens, cfg.head_dim),
                        dtype=np.float16, chunks=(1, min(n_tokens, chunk_tokens), cfg.head_dim),
                        compression="gzip", compression_opts=1, shuffle=True, fletcher32=True)

    def __call__(self, site: str, first_token: int, vectors: torch.Tensor) -> None:
        if site not in self.overflowed and vectors.abs().max().item() > FLOAT16_MAX:
            self.overflowed.add(site)
            warnings.warn(f"{site}: vectors exceed the float16 range ({FLOAT16_MAX:g}); 'act' holds inf there "
                          f"(sv and the metrics are computed in float64 and are unaffected)", ProbeWarning,
                          stacklevel=2)
        self.datasets[site][:, first_token : first_token + vectors.shape[1]] = vectors.to("cpu", torch.float16)


def _write_metrics(group: h5py.Group, sv: np.ndarray, eig: np.ndarray, n: int) -> None:
    # fletcher32 checksums: a bit flip in a stored value fails on read instead of being trusted.
    group.create_dataset("sv", data=sv, fletcher32=True)
    group.create_dataset("eig_cov", data=eig, fletcher32=True)
    for metric, values in all_metrics(sv, eig).items():
        group.create_dataset(metric, data=values, fletcher32=True).attrs["n"] = n


def write_spectra(f: h5py.File, spectra: dict[str, SpectrumAccumulator], gammas: dict[str, torch.Tensor],
                  n_layers: int, per_sequence: dict[str, list[np.ndarray]] | None = None,
                  seq_len: int | None = None) -> None:
    """sv, eig_cov and every metric per site, the per-sequence PR (when given, n = ``seq_len``), and the γ
    vectors (present only in learned and frozen modes)."""
    for layer in range(n_layers):
        for tensor in TENSORS:
            for site in SITES:
                group = f.require_group(f"layers/{layer}/{tensor}/{site}")
                name = f"layer.{layer}/{tensor}/{site}"
                spectrum = spectra[name]
                _write_metrics(group, spectrum.singular_values(), spectrum.covariance_eigenvalues(), spectrum.n)
                if per_sequence is not None:
                    each = np.concatenate(per_sequence[name], axis=0)
                    group.create_dataset("pr_seq_each", data=each, fletcher32=True).attrs["n"] = seq_len
                    group.create_dataset("pr_seq", data=each.mean(0), fletcher32=True).attrs["n"] = seq_len
            gamma = gammas.get(f"layer.{layer}/gamma_{tensor}")
            if gamma is not None:
                f.create_dataset(f"layers/{layer}/gamma_{tensor}", data=gamma.detach().cpu().double().numpy(),
                                 fletcher32=True)


def write_weight_spectra(f: h5py.File, model: GPT) -> None:
    """σ, λ and the four metrics of every head's block of W_Q and W_K (``layers/{i}/{q|k}/weight``)."""
    cfg = model.cfg
    for layer, block in enumerate(model.blocks):
        for tensor, weight, heads in (("q", block.attn.q_proj.weight, cfg.n_heads),
                                      ("k", block.attn.k_proj.weight, cfg.n_kv_heads)):
            group = f.require_group(f"layers/{layer}/{tensor}/weight")
            group.attrs["n"] = cfg.d_model
            sv, eig = weight_spectra(weight, heads)
            _write_metrics(group, sv, eig, cfg.d_model)


def probe_file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete probe file of this schema (a message naming it), or None if it is."""
    return layout.probe_file_problem(path)


def is_complete_probe_file(path: str | Path) -> bool:
    """True if ``path`` opens as HDF5, carries ``complete`` and this schema version (reads attributes only)."""
    return probe_file_problem(path) is None


def probe_snapshot(settings: CellSettings | dict, data_dir: Path, run_dir: Path, tokens: int, out: Path) -> None:
    """Probe the snapshot at ``tokens`` of the cell in ``run_dir`` and write ``out`` atomically."""
    settings = CellSettings.of(settings)
    snap = load_snapshot(Path(run_dir), tokens)
    model_cfg = ModelConfig(**snap["model_config"])
    cell, probe = settings.cell, settings.probe
    if model_cfg.norm_mode != cell.mode:
        raise ProbeError(f"{run_dir}: snapshot mode {model_cfg.norm_mode!r} != cell mode {cell.mode!r}")
    try:
        device = runtime.resolve_device(probe.device)
    except RuntimeError:
        raise ProbeError("config field 'probe.device': 'cuda' requested but CUDA is not available; "
                         "use 'auto' or 'cpu'") from None
    torch.set_num_threads(settings.resources.probe.cpus)
    model = GPT(model_cfg)
    model.load_state_dict(snap["model"])
    model.to(device)
    shards = TokenShards(data_dir)
    windows = probe_batch(shards, probe, settings.train.seq_len)
    n_tokens = int(windows.size)
    message = small_batch_message(n_tokens, model_cfg.head_dim)
    if message:
        warnings.warn(message, ProbeWarning, stacklevel=2)
    if n_tokens > len(shards.splits["val"]):
        warnings.warn(f"probe batch of {n_tokens} tokens is larger than the val split ({len(shards.splits['val'])} "
                      f"tokens): its windows overlap; lower probe.n_sequences or add data", ProbeWarning, stacklevel=2)
    keep_activations = saves_activations(probe.save_activations, model_cfg, n_tokens)
    attrs = {
        "scale": cell.scale, "mode": cell.mode, "optimizer": cell.optimizer, "seed": cell.seed,
        "cell": cell.id, "tokens_seen": int(snap["tokens_seen"]), "step": int(snap["step"]),
        "config_hash": snap["config_hash"], "probe_batch_hash": batch_hash(windows),
        "n_probe_sequences": int(windows.shape[0]), "probe_seq_len": int(windows.shape[1]),
        "n_probe_tokens": n_tokens, "activations_saved": keep_activations,
        "qkrank_version": __version__, "schema_version": SCHEMA_VERSION, "n_layers": model_cfg.n_layers,
        "n_heads": model_cfg.n_heads, "n_kv_heads": model_cfg.n_kv_heads, "head_dim": model_cfg.head_dim,
        "device": device.type, "pr_n": n_tokens, "pr_seq_n": int(windows.shape[1]),
    }
    attrs.update(hdf5_attributes())  # qkrank version, git commit and state, torch version
    if snap.get("val_loss") is not None:
        attrs["val_loss"] = float(snap["val_loss"])
    # No chunk cache: act is written in whole chunks, and a cache would keep them in memory until closing.
    with atomic_path(out) as tmp, h5py.File(tmp, "w", rdcc_nbytes=0) as f:
        f.attrs.update(attrs)
        writer = None
        if keep_activations:
            writer = ActivationWriter(f, model_cfg, n_tokens, probe.chunk_sequences * windows.shape[1])
        per_sequence: dict[str, list[np.ndarray]] = {}
        spectra = measure(model, windows, probe.chunk_sequences, device, writer, per_sequence)
        write_spectra(f, spectra, model.gammas(), model_cfg.n_layers, per_sequence, int(windows.shape[1]))
        write_weight_spectra(f, model)
        f.attrs["complete"] = True  # written last: a file without it is never trusted


def main(argv=None) -> None:
    from qkrank.cell_args import add_settings_args, settings_from_args

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
        with warnings_as_lines("qkrank.probe"):
            probe_snapshot(settings_from_args(args), args.data, args.run_dir, args.tokens, args.out)
    except (qconfig.ConfigError, checkpoint.CheckpointError, ProbeError, DataError) as e:
        sys.exit(f"qkrank.probe: error: {e}")


@contextlib.contextmanager
def warnings_as_lines(prog: str):
    """Within: each warning is one ``<prog>: warning: <message>`` line on stderr (a job log reads cleanly)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


if __name__ == "__main__":
    runtime.imports_done()
    main()
    runtime.exit_finished_job()
