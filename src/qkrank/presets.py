"""Model architectures as data: the norm modes, probe-site names, ModelConfig and the presets table.

Torch-free on purpose: the workflow validates configs (and the CLI counts nothing here) without paying
for importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

NORM_MODES = ("learned", "frozen", "none")
TENSORS = ("q", "k")
SITES = ("proj", "normed", "roped")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model; every derived size is a property."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int
    norm_mode: str = "learned"
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {value!r} must be a positive integer")
        if self.norm_mode not in NORM_MODES:
            raise ValueError(f"norm_mode: {self.norm_mode!r} is not one of {list(NORM_MODES)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise ValueError(f"model: unknown field(s) {bad}; valid fields: {sorted(valid)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


# One row per scale; head_dim, kv_dim and parameter counts are derived (`qkrank info --table`).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                        d_ff=512, max_seq_len=256),
    "88m": ModelConfig(vocab_size=50257, d_model=512, n_layers=22, n_heads=8, n_kv_heads=4,
                       d_ff=2048, max_seq_len=1024),
    "1.5b": ModelConfig(vocab_size=50257, d_model=2048, n_layers=32, n_heads=16, n_kv_heads=8,
                        d_ff=8192, max_seq_len=2048),
}

# Where each row comes from. Seed 000 fixes only 22 layers, head dim 64 and ≈88M. With d_ff = 4·d_model and
# tied GPT-2 embeddings, width 512 is the only multiple of 64 inside 86–90M (448: 75.5M, 576: 107M); at 512,
# full multi-head attention gives 95.0M and seed 004's 2:1 query:KV grouping gives 89.2M (docs/presets.md).
PRESET_SOURCES: dict[str, str] = {
    "tiny": "embedded default: seed 004's shape, small enough for a CPU",
    "88m": "seed 000 (22 layers, head dim 64, ≈88M); width chosen here",
    "1.5b": "seed 004 §1 architecture table (≈1.58B)",
}


def site_name(layer: int, tensor: str, site: str) -> str:
    """Stable probe-site name, used alike in hooks, HDF5 paths, tables and figures."""
    return f"layer.{layer}/{tensor}/{site}"
