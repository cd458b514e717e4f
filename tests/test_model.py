"""The model against the seeds: preset sizes, attention vs a naive reference, RoPE, γ modes, probe sites."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from conftest import micro_config

from qkrank import config as qconfig
from qkrank.model import (
    GPT,
    NORM_MODES,
    PRESET_SOURCES,
    PRESETS,
    SITES,
    TENSORS,
    ModelConfig,
    RMSNorm,
    apply_rope,
    build_on_meta,
    model_summary,
    rope_cache,
)
from qkrank.optim import build_optimizers
from qkrank.settings import OptimSettings

# Small enough that a forward pass and a few optimizer steps take milliseconds, with GQA (2 query heads per KV).
SMALL = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=32)


def small_model(mode: str, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_preset("tiny", norm_mode=mode, **{**SMALL, **overrides}))


def closed_form_count(cfg: ModelConfig) -> tuple[int, int]:
    """(total, embedding) parameters written out from the architecture, independent of the module tree."""
    d, kv, hd = cfg.d_model, cfg.kv_dim, cfg.head_dim
    attention = d * d + d * kv + d * kv + d * d  # W_q, W_k, W_v, W_o; no biases
    mlp = d * cfg.d_ff + cfg.d_ff * d
    block_norms = 2 * d + (2 * hd if cfg.norm_mode == "learned" else 0)  # frozen γ is a buffer
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return embedding + cfg.n_layers * (attention + mlp + block_norms) + d, embedding


@functools.cache
def summary_of(preset: str, mode: str = "learned") -> dict:
    return model_summary(ModelConfig.from_preset(preset, norm_mode=mode))


@pytest.mark.parametrize(("preset", "mode"), [(p, "learned") for p in PRESETS] + [("tiny", "frozen"),
                                                                                   ("tiny", "none")])
def test_preset_counts_on_meta_match_closed_form(preset, mode):
    cfg = ModelConfig.from_preset(preset, norm_mode=mode)
    assert all(p.is_meta for p in build_on_meta(cfg).parameters())
    total, embedding = closed_form_count(cfg)
    summary = summary_of(preset, mode)
    assert summary["n_params"] == total
    assert summary["n_params_embedding"] == embedding
    assert summary["n_params_non_embedding"] == total - embedding


def test_preset_counts_match_the_seeds():
    counts = {name: summary_of(name) for name in PRESETS}
    assert 1.2e6 < counts["tiny"]["n_params"] < 1.3e6  # CPU speed of the embedded default is budgeted
    assert 86e6 <= counts["88m"]["n_params"] <= 90e6  # seed 000: "88M parameter transformer"
    big = counts["1.5b"]
    assert 1.55e9 <= big["n_params"] <= 1.60e9  # seed 004: "~1.58B Parameters"
    assert abs(big["n_params_non_embedding"] - 1.476e9) < 1e6
    assert big["n_params_embedding"] == 50257 * 2048 and abs(big["n_params_embedding"] - 0.103e9) < 1e6
    # Seed 004 §4.1: 32 layers × 2 γ vectors of 128 = 8,192 learnable γ values.
    frozen = summary_of("1.5b", "frozen")
    assert big["n_params"] - frozen["n_params"] == 32 * 2 * 128 == 8192


def test_preset_shapes_follow_the_seeds():
    big, mid = PRESETS["1.5b"], PRESETS["88m"]
    assert (big.d_model, big.n_layers, big.n_heads, big.head_dim, big.n_kv_heads, big.d_ff, big.max_seq_len,
            big.vocab_size) == (2048, 32, 16, 128, 8, 8192, 2048, 50257)
    assert (mid.n_layers, mid.head_dim) == (22, 64)
    assert set(PRESET_SOURCES) == set(PRESETS)


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match=r"unknown preset '2b'.*'1\.5b'.*'88m'.*'tiny'"):
        ModelConfig.from_preset("2b")
    with pytest.raises(ValueError, match="norm_mode: 'half'"):
        ModelConfig.from_preset("tiny", norm_mode="half")
    with pytest.raises(ValueError, match="n_layers: 0 must be a positive integer"):
        ModelConfig.from_preset("tiny", n_layers=0)
    with pytest.raises(ValueError, match="not divisible by n_kv_heads 3"):
        ModelConfig.from_preset("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['width'\]"):
        ModelConfig.from_preset("tiny", width=3)


def naive_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Seed 004 §4.1 written out: RMSNorm(xW)·γ, RoPE, explicit causal softmax, K/V repeated per group."""
    cfg = attn.cfg
    B, T, _ = x.shape
    hd, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads

    def heads(w, n):
        return (x @ w.T).view(B, T, n, hd).transpose(1, 2)

    q, k, v = heads(attn.q_proj.weight, cfg.n_heads), heads(attn.k_proj.weight, cfg.n_kv_heads), \
        heads(attn.v_proj.weight, cfg.n_kv_heads)
    if attn.q_norm is not None:
        q = q / torch.sqrt((q ** 2).mean(-1, keepdim=True) + cfg.norm_eps) * attn.q_norm.weight
        k = k / torch.sqrt((k ** 2).mean(-1, keepdim=True) + cfg.norm_eps) * attn.k_norm.weight
    angle = torch.arange(T)[:, None] * cfg.rope_base ** (-torch.arange(0, hd, 2) / hd)
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rope(t):
        out = t.clone()
        out[..., 0::2] = t[..., 0::2] * cos - t[..., 1::2] * sin
        out[..., 1::2] = t[..., 0::2] * sin + t[..., 1::2] * cos
        return out

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # query head h reads KV h // group
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return y.transpose(1, 2).reshape(B, T, cfg.d_model) @ attn.o_proj.weight.T


@pytest.mark.parametrize("mode", NORM_MODES)
def test_sdpa_attention_equals_naive_reference(mode):
    model = small_model(mode)
    attn = model.blocks[1].attn
    with torch.no_grad():
        if attn.q_norm is not None:  # distinct γ per dimension, so a wrong axis or a missing γ would show
            attn.q_norm.weight.copy_(torch.linspace(0.5, 1.5, model.cfg.head_dim))
            attn.k_norm.weight.copy_(torch.linspace(1.5, 0.5, model.cfg.head_dim))
        for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
            w.normal_(std=0.3)  # larger than init so attention is far from uniform
        x = torch.randn(3, 20, model.cfg.d_model)
        got = attn(x, model.rope_cos, model.rope_sin)
        want = naive_attention(attn, x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def rms_norm_reference(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x)_j = γ_j · x_j / sqrt(mean_i x_i² + eps), in float64."""
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma.double()


@pytest.mark.parametrize("trainable", [True, False])
def test_rms_norm_matches_the_formula(trainable):
    torch.manual_seed(3)
    norm = RMSNorm(64, eps=1e-6, trainable=trainable)
    assert isinstance(norm.weight, torch.nn.Parameter) == trainable  # a frozen γ is a buffer
    assert [n for n, _ in norm.named_buffers()] == ([] if trainable else ["weight"])
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))  # a wrong axis or a missing γ would show
    x = torch.randn(4, 16, 64) * 3
    x[0, 0] = 1e-5  # eps matters here: a norm without it (or with it outside the root) would differ
    want = rms_norm_reference(x, norm.weight, 1e-6)
    # float32 computation against float64: the default float32 tolerances (rtol 1.3e-6, atol 1e-5).
    torch.testing.assert_close(norm(x), want.float())
    # bf16 in, bf16 out, computed in float32: within bf16 rounding of the exact value.
    got_bf16 = norm(x.bfloat16())
    assert got_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf16, want.bfloat16())


def test_rope_score_depends_only_on_relative_position():
    torch.manual_seed(1)
    head_dim, T = 16, 24
    cos, sin = rope_cache(T, head_dim, base=10000.0)
    q_vec, k_vec = torch.randn(head_dim), torch.randn(head_dim)
    q = apply_rope(q_vec.expand(1, 1, T, head_dim), cos, sin)[0, 0]
    k = apply_rope(k_vec.expand(1, 1, T, head_dim), cos, sin)[0, 0]
    scores = q @ k.T  # scores[m, n] = <RoPE(q, m), RoPE(k, n)>
    for offset in range(-5, 6):
        diagonal = torch.diagonal(scores, offset=offset)
        assert torch.allclose(diagonal, diagonal[0].expand_as(diagonal), atol=1e-5)
    assert (torch.diagonal(scores, 0)[0] - torch.diagonal(scores, 3)[0]).abs() > 1e-3  # position does matter
    assert torch.allclose(q.norm(dim=-1), q_vec.norm().expand(T), atol=1e-5)  # a rotation keeps length


def optimizer_settings() -> OptimSettings:
    cfg = qconfig.load(micro_config())
    return OptimSettings.from_dict(qconfig.cell_settings(cfg, qconfig.cells(cfg)[0])["optim"])


def train_steps(model: GPT, optimizer: str, steps: int = 3) -> dict[str, torch.optim.Optimizer]:
    optimizers = build_optimizers(model, optimizer, optimizer_settings())
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, model.cfg.vocab_size, (4, 17), generator=gen)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    return optimizers


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_gamma_modes_after_training(optimizer):
    learned, frozen, none = (small_model(mode) for mode in NORM_MODES)
    learned_opts, frozen_opts, _ = (train_steps(model, optimizer) for model in (learned, frozen, none))
    learned_gammas = learned.gammas()
    assert len(learned_gammas) == 2 * learned.cfg.n_layers
    assert all((g - 1).abs().max() > 1e-4 for g in learned_gammas.values())
    gamma_params = {id(p) for name, p in learned.named_parameters() if re.search(r"attn\.[qk]_norm", name)}
    assert gamma_params <= {id(p) for p in learned_opts["adamw"].state}  # γ is trained, by AdamW

    gammas = frozen.gammas()
    assert len(gammas) == 2 * frozen.cfg.n_layers
    assert all(torch.equal(g, torch.ones_like(g)) for g in gammas.values())
    state = frozen.state_dict()
    for i in range(frozen.cfg.n_layers):
        for t in TENSORS:
            assert torch.equal(state[f"blocks.{i}.attn.{t}_norm.weight"], torch.ones(frozen.cfg.head_dim))
    assert not any(re.search(r"attn\.[qk]_norm", name) for name, _ in frozen.named_parameters())
    gamma_ids = {id(b) for name, b in frozen.named_buffers() if re.search(r"attn\.[qk]_norm", name)}
    for opt in frozen_opts.values():
        assert not gamma_ids & {id(p) for group in opt.param_groups for p in group["params"]}
        assert not gamma_ids & {id(p) for p in opt.state}

    assert none.gammas() == {}
    assert not any("q_norm" in k or "k_norm" in k for k in none.state_dict())


def test_modes_share_every_other_initial_weight():
    states = {mode: small_model(mode, seed=7).state_dict() for mode in NORM_MODES}
    shared = set(states["none"])
    for mode in ("learned", "frozen"):
        extra = set(states[mode]) - shared
        assert extra == {f"blocks.{i}.attn.{t}_norm.weight" for i in range(SMALL["n_layers"]) for t in TENSORS}
        assert all(torch.equal(states[mode][k], states["none"][k]) for k in shared)
    other_seed = small_model("none", seed=8).state_dict()
    assert not torch.equal(other_seed["blocks.0.attn.k_proj.weight"], states["none"]["blocks.0.attn.k_proj.weight"])


@pytest.mark.parametrize("mode", NORM_MODES)
def test_probe_sites(mode):
    model = small_model(mode)
    if mode == "learned":
        train_steps(model, "muon", steps=2)  # γ away from 1, so dividing by it is a real check
    model.eval()
    batch = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(batch)
        with model.capture() as store:
            captured_logits = model(batch)
        after = model(batch)
    assert torch.equal(plain, captured_logits) and torch.equal(plain, after)
    assert all(block.attn.captured is None for block in model.blocks)  # capture ends with the block

    cfg = model.cfg
    expected = {f"layer.{i}/{t}/{s}" for i in range(cfg.n_layers) for t in TENSORS for s in SITES}
    assert set(store) == expected
    gammas = model.gammas()
    for i in range(cfg.n_layers):
        for t, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
            proj, normed, roped = (store[f"layer.{i}/{t}/{s}"] for s in SITES)
            assert proj.shape == (2, heads, 12, cfg.head_dim)
            if mode == "none":
                assert torch.equal(normed, proj)
            else:
                rms = (normed / gammas[f"layer.{i}/gamma_{t}"]).pow(2).mean(-1).sqrt()
                assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
            assert torch.allclose(roped, apply_rope(normed, model.rope_cos, model.rope_sin))
