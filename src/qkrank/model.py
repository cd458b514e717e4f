"""Decoder-only transformer with QK-RMSNorm modes and named probe sites (seed 004 §1, §4.1).

Per attention head: q = W_q x, k = W_k x; in modes ``learned``/``frozen`` each of q and k is
RMS-normalised over the head dimension and scaled by its own γ (one γ vector per layer for q and one
for k, shared across heads), then rotated by RoPE. Mode ``none`` skips the norm. Probe sites
``layer.{i}/{q|k}/{proj|normed|roped}`` expose the vectors without changing the forward pass.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from qkrank.losses import linear_cross_entropy
from qkrank.presets import (  # noqa: F401  (re-exported: the model's public names)
    NORM_MODES,
    PRESET_SOURCES,
    PRESETS,
    SITES,
    TENSORS,
    ModelConfig,
    site_name,
)


class RMSNorm(nn.Module):
    """RMSNorm(x)_j = γ_j · x_j / sqrt(mean_i x_i² + eps); γ trainable or fixed at 1."""

    def __init__(self, dim: int, eps: float, trainable: bool = True):
        super().__init__()
        self.eps = eps
        gamma = torch.ones(dim)
        if trainable:
            self.weight = nn.Parameter(gamma)
        else:
            # A buffer: saved with the model, never seen by an optimizer.
            self.register_buffer("weight", gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the input dtype (bf16 autocast included), like the reference formula.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope_cache(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim/2) for rotary position encoding."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by position-dependent angles; x is (B, heads, T, head_dim)."""
    T = x.shape[-2]
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        if cfg.norm_mode == "none":
            self.q_norm = self.k_norm = None
        else:
            trainable = cfg.norm_mode == "learned"
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, trainable)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, trainable)
        self.captured: dict[str, torch.Tensor] | None = None

    def _capture(self, tensor: str, site: str, value: torch.Tensor) -> None:
        if self.captured is not None:
            self.captured[site_name(self.layer, tensor, site)] = value.detach()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, self.cfg.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)
        self._capture("q", "proj", q)
        self._capture("k", "proj", k)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        self._capture("q", "normed", q)
        self._capture("k", "normed", k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self._capture("q", "roped", q)
        self._capture("k", "roped", k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.cfg.d_model))


class MLP(nn.Module):
    """Two-matrix GELU MLP (the count that matches seed 004's 1.58B)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: residual-branch outputs scaled down by depth.
        for block in self.blocks:
            for w in (block.attn.o_proj.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, fused_loss: bool = False):
        """Logits (B, T, vocab); with targets, also the mean cross-entropy. ``fused_loss`` (with targets): the
        loss without logits, a chunk of tokens at a time (qkrank.losses); the logits returned are None."""
        hidden = self.final_norm(self.residual_stream(idx))
        if targets is not None and fused_loss:
            return None, linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten())
        logits = self.lm_head(hidden)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def residual_stream(self, idx: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last block (B, T, d_model): all a probe's capture needs, no logits."""
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        return x

    @contextmanager
    def capture(self):
        """Within the block, every forward pass fills the yielded dict: site name → (B, heads, T, head_dim)."""
        store: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            block.attn.captured = store
        try:
            yield store
        finally:
            for block in self.blocks:
                block.attn.captured = None

    def gammas(self) -> dict[str, torch.Tensor]:
        """γ vectors by name ``layer.{i}/gamma_{q|k}``; empty in mode ``none``."""
        out = {}
        for i, block in enumerate(self.blocks):
            if block.attn.q_norm is not None:
                out[f"layer.{i}/gamma_q"] = block.attn.q_norm.weight.detach()
                out[f"layer.{i}/gamma_k"] = block.attn.k_norm.weight.detach()
        return out

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters, tied weights once; a frozen γ is a buffer, not a parameter, and is not counted."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total


def build_on_meta(cfg: ModelConfig) -> GPT:
    """The model without allocating memory: for counting parameters of any preset."""
    with torch.device("meta"):
        return GPT(cfg)


def model_summary(cfg: ModelConfig) -> dict:
    """Sizes and parameter counts of a config, computed on the meta device."""
    model = build_on_meta(cfg)
    n_params, n_non_embedding = model.num_params(), model.num_params(non_embedding=True)
    return {
        **cfg.to_dict(),
        "head_dim": cfg.head_dim,
        "kv_dim": cfg.kv_dim,
        "n_params": n_params,
        "n_params_non_embedding": n_non_embedding,
        "n_params_embedding": n_params - n_non_embedding,
    }
