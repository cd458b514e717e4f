"""Probe one revision of a public checkpoint suite (Pythia, OLMo-2) into the same HDF5 layout as qkrank.probe.

``python -m qkrank.probe_hf --settings runs/<cell>/settings.json --data results/data --tokens T --out
runs/<cell>/probe/T.h5`` loads the revision at ``T`` tokens with transformers and captures the sites from
the model's own modules: ``proj`` and ``normed`` by forward hooks on its projections and QK-Norm layers,
``roped`` from what its attention modules hand to the attention kernel (a registered transformers attention
function that records q and k, then runs SDPA), i.e. after the model's own rotary function. Nothing of the
forward pass is re-implemented. docs/suites.md says what each site is in each architecture.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # A job process: cyclic collections while torch imports scan its ~10⁵ new objects again and again, a
    # fifth of a probe job's wall time; runtime.imports_done() turns them back on.
    gc.disable()

import argparse
import contextlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from qkrank import __version__, identity, runtime, suites
from qkrank import config as qconfig
from qkrank.atomic import atomic_path
from qkrank.data import DataError, TokenShards
from qkrank.probe import (
    SCHEMA_VERSION,
    ActivationWriter,
    ProbeError,
    ProbeWarning,
    batch_hash,
    measure,
    saves_activations,
    small_batch_message,
    warnings_as_lines,
    write_spectra,
)

ATTENTION = "qkrank_capture"  # the transformers attention implementation that records roped q and k
_sink = None  # while a capture runs: callable(layer_idx, query, key)


class HFProbeError(ProbeError):
    """A suite checkpoint, tokenizer or probe batch that cannot be used; the message names it."""


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that first hands the (batch, heads, tokens, d) query and key to the active sink."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _sink is not None:
        _sink(module.layer_idx, query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _capturing_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@dataclass(frozen=True)
class Shape:
    """What ActivationWriter and saves_activations read of a model (the fields of qkrank's ModelConfig)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


def _per_head(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, heads·d) → (B, heads, T, d)."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


class SuiteModel:
    """A transformers model seen through qkrank's probe sites; ``measure`` drives it like qkrank's GPT."""

    def __init__(self, model, model_type: str):
        self.model, self.arch = model, suites.architecture(model_type, "model")
        cfg = model.config
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        self.shape = Shape(cfg.num_hidden_layers, n_heads, getattr(cfg, "num_key_value_heads", None) or n_heads,
                           head_dim)
        self.layers = list(model.layers)
        self.rotary_dims = (self.layers[0].attention.rotary_ndims if model_type == "gpt_neox" else head_dim)

    def eval(self):
        self.model.eval()
        return self

    def residual_stream(self, input_ids: torch.Tensor):
        """The base model's forward (AutoModel: no LM head); its hooks fill ``capture``'s dict."""
        return self.model(input_ids=input_ids, use_cache=False)

    def _hooks(self, captured: dict) -> list:
        d = self.shape.head_dim

        def store(name):
            def hook(module, args, output):
                captured[name] = _per_head(output, d)
            return hook

        def store_fused(i):
            # GPT-NeoX: per head [q | k | v] along the last axis, as its attention module splits it.
            def hook(module, args, output):
                q, k, _ = output.view(*output.shape[:2], self.shape.n_heads, 3 * d).transpose(1, 2).chunk(3, -1)
                for tensor, value in (("q", q), ("k", k)):
                    captured[f"layer.{i}/{tensor}/proj"] = value
                    captured[f"layer.{i}/{tensor}/normed"] = value
            return hook

        handles = []
        for i, layer in enumerate(self.layers):
            if self.arch.model_type == "gpt_neox":
                handles.append(layer.attention.query_key_value.register_forward_hook(store_fused(i)))
            else:
                attn = layer.self_attn
                for tensor in ("q", "k"):
                    handles.append(getattr(attn, f"{tensor}_proj").register_forward_hook(
                        store(f"layer.{i}/{tensor}/proj")))
                    handles.append(getattr(attn, f"{tensor}_norm").register_forward_hook(
                        store(f"layer.{i}/{tensor}/normed")))
        return handles

    @contextlib.contextmanager
    def capture(self):
        """Yields a dict filled during a forward pass: site name → (B, heads, T, d)."""
        global _sink
        captured: dict[str, torch.Tensor] = {}

        def sink(layer_idx, query, key):
            captured[f"layer.{layer_idx}/q/roped"] = query
            captured[f"layer.{layer_idx}/k/roped"] = key

        handles = self._hooks(captured)
        _sink = sink
        try:
            yield captured
        finally:
            _sink = None
            for h in handles:
                h.remove()
        missing = [f"layer.{i}/{t}/{s}" for i in range(self.shape.n_layers) for t in ("q", "k")
                   for s in ("proj", "normed", "roped") if f"layer.{i}/{t}/{s}" not in captured]
        if captured and missing:
            raise HFProbeError(f"the forward pass did not reach {missing[:3]}...: this transformers version routes "
                               f"{self.arch.model_type} attention differently; qkrank.probe_hf needs transformers "
                               f"with AttentionInterface (>= 4.56)")

    def gammas(self) -> dict[str, torch.Tensor]:
        """OLMo-2: q_norm / k_norm weights (one per whole projection) reshaped (heads, d); GPT-NeoX: none."""
        if self.arch.model_type != "olmo2":
            return {}
        d = self.shape.head_dim
        return {f"layer.{i}/gamma_{t}": getattr(layer.self_attn, f"{t}_norm").weight.detach().view(-1, d)
                for i, layer in enumerate(self.layers) for t in ("q", "k")}


def load(hf: str, revision: str, architecture: str, dtype: str, device: torch.device):
    """(SuiteModel, tokenizer) of one revision; the architecture is checked from config.json before any weights."""
    where = f"{hf}@{revision}"
    model_type = suites.read_model_type(hf, revision)
    suites.architecture(model_type, where)
    if model_type != architecture:
        raise HFProbeError(f"{where}: config.json says {model_type!r}, the config's model.architecture says "
                           f"{architecture!r}")
    from transformers import AutoModel, AutoTokenizer

    register_attention()
    source, hub_revision = suites.checkpoint_source(hf, revision)
    model = AutoModel.from_pretrained(source, revision=hub_revision, dtype=getattr(torch, dtype),
                                      attn_implementation=ATTENTION)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=hub_revision)
    return SuiteModel(model.to(device), model_type), tokenizer


def corpus_texts(data_dir: Path) -> list[str]:
    """The study's held-out documents as text: the val split decoded with the study's own tokenizer
    (byte-level BPE: decoding gives back the original text), split at its end-of-text separators."""
    from tokenizers import Tokenizer

    shards = TokenShards(data_dir)
    tokenizer = Tokenizer.from_file(str(Path(data_dir) / "tokenizer.json"))
    ids = np.asarray(shards.splits["val"], dtype=np.int64)
    cuts = np.flatnonzero(ids == shards.manifest["eos_id"])
    docs = np.split(ids, cuts + 1)
    return [text for doc in docs if len(doc) and (text := tokenizer.decode(doc.tolist(), skip_special_tokens=True))]


def encode_texts(tokenizer, texts: list[str]) -> np.ndarray:
    """Documents encoded with the model's own tokenizer, each followed by its end-of-text token (if it has one)."""
    eos = tokenizer.eos_token_id
    pieces = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        pieces.append(np.asarray(ids + ([eos] if eos is not None else []), dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def fixed_windows(ids: np.ndarray, n_rows: int, length: int) -> np.ndarray:
    """``n_rows`` evenly spaced windows of ``length`` tokens (TokenShards.fixed_windows' rule)."""
    n = len(ids) - length + 1
    if n < 1:
        raise HFProbeError(f"the held-out split has {len(ids)} tokens in the model's tokenizer, fewer than one "
                           f"probe window of {length}; lower probe.seq_len or add data")
    starts = np.linspace(0, n - 1, num=n_rows).round().astype(np.int64)
    return ids[starts[:, None] + np.arange(length)[None, :]]


def revision_at(settings: dict, tokens: int) -> dict:
    for entry in settings["schedule"]:
        if entry["tokens"] == tokens:
            return entry
    raise HFProbeError(f"no revision of {settings['model']['hf']} at {tokens} tokens; have "
                       f"{[e['tokens'] for e in settings['schedule']]}")


def probe_revision(settings: dict, data_dir: Path, tokens: int, out: Path) -> None:
    """Probe the suite's revision at ``tokens`` and write ``out`` atomically (docs/hdf5.md layout)."""
    entry = revision_at(settings, tokens)
    model_cfg, probe_cfg, cell = settings["model"], settings["probe"], settings["cell"]
    try:
        device = runtime.resolve_device(probe_cfg["device"])
    except RuntimeError:
        raise HFProbeError("config field 'probe.device': 'cuda' requested but CUDA is not available; "
                           "use 'auto' or 'cpu'") from None
    torch.set_num_threads(settings["resources"]["probe"]["cpus"])
    model, tokenizer = load(model_cfg["hf"], entry["revision"], model_cfg["architecture"], model_cfg["dtype"], device)
    if model.arch.mode != cell["mode"]:
        raise HFProbeError(f"{model_cfg['hf']}: architecture mode {model.arch.mode!r} != cell mode {cell['mode']!r}")
    windows = fixed_windows(encode_texts(tokenizer, corpus_texts(data_dir)), probe_cfg["n_sequences"],
                            probe_cfg["seq_len"])
    n_tokens = int(windows.size)
    shape = model.shape
    message = small_batch_message(n_tokens, shape.head_dim)
    if message:
        warnings.warn(message, ProbeWarning, stacklevel=2)
    keep_activations = saves_activations(probe_cfg["save_activations"], shape, n_tokens)
    import transformers

    attrs = {
        "scale": cell["scale"], "mode": cell["mode"], "optimizer": cell["optimizer"], "seed": cell["seed"],
        "cell": cell["id"], "tokens_seen": int(tokens), "step": -1 if entry["step"] is None else int(entry["step"]),
        "config_hash": qconfig.config_hash({"model": model_cfg, "revision": entry["revision"]}),
        "probe_batch_hash": batch_hash(windows), "n_probe_sequences": int(windows.shape[0]),
        "probe_seq_len": int(windows.shape[1]), "n_probe_tokens": n_tokens, "activations_saved": keep_activations,
        "qkrank_version": __version__, "schema_version": SCHEMA_VERSION, "n_layers": shape.n_layers,
        "n_heads": shape.n_heads, "n_kv_heads": shape.n_kv_heads, "head_dim": shape.head_dim, "device": device.type,
        # hf checkpoints only (docs/suites.md)
        "hf_model": model_cfg["hf"], "hf_revision": entry["revision"], "architecture": model.arch.model_type,
        "hf_commit": str(getattr(model.model.config, "_commit_hash", None) or ""),
        "rotary_dims": int(model.rotary_dims), "weights_dtype": model_cfg["dtype"],
        "transformers_version": transformers.__version__,
    }
    with atomic_path(out) as tmp, h5py.File(tmp, "w", rdcc_nbytes=0) as f:
        f.attrs.update(attrs)
        writer = None
        if keep_activations:
            writer = ActivationWriter(f, shape, n_tokens, probe_cfg["chunk_sequences"] * windows.shape[1])
        spectra = measure(model, windows, probe_cfg["chunk_sequences"], device, writer)
        write_spectra(f, spectra, model.gammas(), shape.n_layers)
        f.attrs["complete"] = True  # written last: a file without it is never trusted


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Probe one revision of a public checkpoint suite into an HDF5 file.")
    parser.add_argument("--settings", required=True, type=Path, help="the hf cell's settings.json")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--tokens", required=True, type=int, help="tokens seen of the revision to probe")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        with warnings_as_lines("qkrank.probe_hf"):
            probe_revision(identity.load_cell_settings(args.settings), args.data, args.tokens, args.out)
    except (qconfig.ConfigError, suites.SuiteError, ProbeError, DataError) as e:
        sys.exit(f"qkrank.probe_hf: error: {e}")


if __name__ == "__main__":
    runtime.imports_done()
    main()
    runtime.exit_finished_job()
