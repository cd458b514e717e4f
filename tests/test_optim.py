"""Which tensor goes to which optimizer, for every preset and mode; torch's own Muon; the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import micro_config

from qkrank import config as qconfig
from qkrank.model import GPT, NORM_MODES, PRESETS, ModelConfig, build_on_meta
from qkrank.optim import build_optimizers, lr_factor, set_lr, split_parameters
from qkrank.settings import OptimSettings, ScheduleSettings


def expected_assignment(cfg: ModelConfig) -> tuple[set[str], set[str]]:
    """(muon, adamw) parameter names as the seeds describe them, listed by role rather than by shape."""
    muon, adamw = set(), {"embed.weight", "final_norm.weight"}  # tied: the head is the embedding
    for i in range(cfg.n_layers):
        muon |= {f"blocks.{i}.attn.{m}_proj.weight" for m in "qkvo"} | {f"blocks.{i}.mlp.{m}.weight" for m in
                                                                          ("up", "down")}
        adamw |= {f"blocks.{i}.attn_norm.weight", f"blocks.{i}.mlp_norm.weight"}
        if cfg.norm_mode == "learned":
            adamw |= {f"blocks.{i}.attn.q_norm.weight", f"blocks.{i}.attn.k_norm.weight"}
    return muon, adamw


@pytest.mark.parametrize("mode", NORM_MODES)
def test_split_lists_every_parameter_once_for_every_preset(mode):
    for preset in PRESETS:
        cfg = ModelConfig.from_preset(preset, norm_mode=mode)
        model = build_on_meta(cfg)
        groups = split_parameters(model, "muon")
        muon, adamw = ({name for name, _ in groups[g]} for g in ("muon", "adamw"))
        assert (muon, adamw) == expected_assignment(cfg), preset
        assert not muon & adamw
        assert muon | adamw == {name for name, _ in model.named_parameters()}
        assert sum(p.numel() for g in groups.values() for _, p in g) == model.num_params()
        assert "lm_head.weight" not in muon | adamw  # tied weight listed once, as the embedding
        gamma_names = {n for n in muon | adamw if ".attn.q_norm." in n or ".attn.k_norm." in n}
        assert len(gamma_names) == (2 * cfg.n_layers if mode == "learned" else 0)  # frozen γ is a buffer
        assert gamma_names <= adamw

        everything = split_parameters(model, "adamw")
        assert set(everything) == {"adamw"}
        assert {name for name, _ in everything["adamw"]} == muon | adamw


def test_untied_head_goes_to_adamw_and_wrappers_change_nothing():
    cfg = ModelConfig.from_preset("tiny", n_layers=1, tie_embeddings=False)
    model = build_on_meta(cfg)
    adamw = {name for name, _ in split_parameters(model, "muon")["adamw"]}
    assert {"embed.weight", "lm_head.weight"} <= adamw

    class Wrapper(nn.Module):  # as DDP or torch.compile would prefix names
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    wrapped = split_parameters(Wrapper(model), "muon")
    plain = split_parameters(model, "muon")
    assert {g: [p for _, p in v] for g, v in wrapped.items()} == {g: [p for _, p in v] for g, v in plain.items()}


def test_bad_optimizer_and_a_model_without_matrices_fail_clearly():
    model = build_on_meta(ModelConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match=r"optimizer 'sgd' is not one of \['muon', 'adamw'\]"):
        split_parameters(model, "sgd")
    with pytest.raises(ValueError, match="no 2-D weight matrices under 'blocks'"):
        split_parameters(nn.Linear(3, 3), "muon")


def optim_settings(**changes) -> OptimSettings:
    """The micro cell's optim section, each ``section={field: value}`` of ``changes`` set (adamw_hidden too)."""
    cfg = qconfig.load(micro_config())
    optim = qconfig.cell_settings(cfg, qconfig.cells(cfg)[0])["optim"]
    for section, values in changes.items():
        optim[section] = {**(optim.get(section) or {}), **values}
    return OptimSettings.from_dict(optim)


def test_build_optimizers_uses_torch_muon_with_config_values():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", n_layers=1, vocab_size=64))
    settings = optim_settings(muon={"lr": 0.031, "momentum": 0.9, "nesterov": False, "ns_steps": 3,
                                    "adjust_lr_fn": "match_rms_adamw"},
                              adamw={"lr": 0.0021, "weight_decay": 0.1})
    optimizers = build_optimizers(model, "muon", settings)
    assert type(optimizers["muon"]) is torch.optim.Muon
    assert type(optimizers["adamw"]) is torch.optim.AdamW
    muon_group = optimizers["muon"].param_groups[0]
    assert (muon_group["lr"], muon_group["momentum"], muon_group["nesterov"], muon_group["ns_steps"],
            muon_group["adjust_lr_fn"]) == (0.031, 0.9, False, 3, "match_rms_adamw")
    assert all(p.ndim == 2 for p in muon_group["params"])
    # Decay on γ would pull it toward 0 rather than its initial 1: only 2-D tensors are decayed.
    decay_by_ndim = {(p.ndim, g["weight_decay"]) for g in optimizers["adamw"].param_groups for p in g["params"]}
    assert decay_by_ndim == {(2, 0.1), (1, 0.0)}

    only_adamw = build_optimizers(model, "adamw", settings)
    assert set(only_adamw) == {"adamw"}
    assert sum(p.numel() for g in only_adamw["adamw"].param_groups for p in g["params"]) == model.num_params()

    lrs = set_lr(optimizers, 0.5)
    assert lrs == {"muon": 0.031 * 0.5, "adamw": 0.0021 * 0.5}
    assert all(g["lr"] == g["base_lr"] * 0.5 for opt in optimizers.values() for g in opt.param_groups)


def test_lr_factor_warmup_then_decay_to_floor():
    total, warmup = 1000, 100
    for decay in ("constant", "linear", "cosine"):
        schedule = ScheduleSettings(warmup_tokens=warmup, decay=decay, min_lr_ratio=0.1)
        assert lr_factor(50, total, schedule) == pytest.approx(0.5)
        assert lr_factor(warmup, total, schedule) == pytest.approx(1.0)
        end = lr_factor(total, total, schedule)
        assert end == pytest.approx(1.0 if decay == "constant" else 0.1)
    middle = 100 + 450
    assert lr_factor(middle, total, ScheduleSettings(warmup_tokens=warmup, decay="linear", min_lr_ratio=0.1)) == \
        pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(middle, total, ScheduleSettings(warmup_tokens=warmup, decay="cosine", min_lr_ratio=0.0)) == \
        pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def _groups_without_params(opt: torch.optim.Optimizer, names: dict[int, str]) -> list[dict]:
    """Each param group's settings and parameter names (the schedule's lr factor aside)."""
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": sorted(names[id(p)] for p in g["params"])}
            for g in opt.param_groups]


@pytest.mark.parametrize("mode", NORM_MODES)
def test_adamw_cells_change_only_the_hidden_matrices_optimizer(mode):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", n_layers=2, vocab_size=64, norm_mode=mode))
    names = {id(p): n for n, p in model.named_parameters()}
    settings = optim_settings(adamw={"lr": 0.003, "weight_decay": 0.05, "beta2": 0.97},
                              adamw_hidden={"lr": 6e-4, "weight_decay": 0.1})
    muon = build_optimizers(model, "muon", settings)
    adamw = build_optimizers(model, "adamw", settings)
    shared = _groups_without_params(muon["adamw"], names)
    groups = _groups_without_params(adamw["adamw"], names)
    # The groups AdamW holds in a muon cell (embeddings, head, γ, 1-D) are the first groups of the adamw
    # cell's AdamW, identical in every setting and every parameter.
    assert groups[:len(shared)] == shared
    assert {g["lr"] for g in shared} == {0.003} and {g["betas"] for g in shared} == {(0.9, 0.97)}
    hidden = groups[len(shared):]
    assert [g["params"] for g in hidden] == [sorted(n for n, _ in split_parameters(model, "muon")["muon"])]
    assert (hidden[0]["lr"], hidden[0]["weight_decay"], hidden[0]["betas"], hidden[0]["eps"]) == \
        (6e-4, 0.1, (0.9, 0.97), 1e-8)  # unset keys of adamw_hidden fall back to optim.adamw
    # The schedule scales every group by the same factor; the logged AdamW lr is the shared groups'.
    assert set_lr(adamw, 0.5) == {"adamw": 0.0015} and hidden[0]["lr"] == 6e-4
    assert adamw["adamw"].param_groups[-1]["lr"] == pytest.approx(3e-4)


def test_without_adamw_hidden_an_adamw_cell_trains_everything_at_the_adamw_settings():
    model = GPT(ModelConfig.from_preset("tiny", n_layers=1, vocab_size=64))
    opt = build_optimizers(model, "adamw", optim_settings(adamw={"lr": 0.002}))["adamw"]
    assert {g["lr"] for g in opt.param_groups} == {0.002}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


def test_adamw_hidden_is_not_part_of_a_muon_cells_training_identity():
    cfg = micro_config()
    cfg["grid"]["optimizers"] = ["muon", "adamw"]
    base = qconfig.load(cfg)
    cfg["scales"]["tiny"]["optim"] = {"adamw_hidden": {"lr": 1e-4}}
    changed = qconfig.load(cfg)
    for cell in qconfig.cells(base):
        same = qconfig.training_identity(qconfig.cell_settings(base, cell)) == \
            qconfig.training_identity(qconfig.cell_settings(changed, cell))
        assert same == (cell.optimizer == "muon"), cell.id
