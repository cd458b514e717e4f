"""Which tensor goes to which optimizer, the optimizers themselves, and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from qkrank.settings import AdamWSettings, OptimSettings, ScheduleSettings

OPTIMIZERS = ("muon", "adamw")


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """A 2-D weight inside a transformer block (attention or MLP): what Muon updates in muon cells."""
    # By path component, so a DDP/compile wrapper's "module."/"_orig_mod." prefix changes nothing.
    return param.ndim == 2 and "blocks" in name.split(".")


def split_parameters(model: nn.Module, optimizer: str) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Named trainable parameters by optimizer group.

    ``muon``: 2-D weight matrices inside transformer blocks (attention and MLP) go to Muon; embeddings,
    the output head, every norm's γ and any 1-D parameter go to AdamW. ``adamw``: everything to AdamW.
    Tied weights appear once; buffers (frozen γ) never appear.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is not one of {list(OPTIMIZERS)}")
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw": []}
    for name, param in model.named_parameters():  # deduplicates tied weights
        if not param.requires_grad:
            continue
        groups["muon" if optimizer == "muon" and is_hidden_matrix(name, param) else "adamw"].append((name, param))
    if optimizer == "muon" and not groups["muon"]:
        raise ValueError("optimizer 'muon': the model has no 2-D weight matrices under 'blocks' for Muon; "
                         "use optimizer 'adamw' for such a model")
    return {k: v for k, v in groups.items() if v}


def _adamw_groups(params: list[nn.Parameter], settings: AdamWSettings) -> list[dict]:
    """AdamW parameter groups of one settings block; weight decay only for tensors of 2+ dims."""
    # Decay would pull γ (and any gain) toward 0, not toward its initial 1, biasing the very
    # quantity under study; so only matrices and embeddings are decayed.
    decayed = [p for p in params if p.ndim >= 2]
    undecayed = [p for p in params if p.ndim < 2]
    return [{"params": ps, "lr": settings.lr, "betas": (settings.beta1, settings.beta2), "eps": settings.eps,
             "weight_decay": wd}
            for ps, wd in ((decayed, settings.weight_decay), (undecayed, 0.0)) if ps]


def hidden_adamw(optim: OptimSettings) -> AdamWSettings:
    """adamw cells' hidden matrices: ``optim.adamw_hidden``'s fields where set, else ``optim.adamw``'s."""
    given = optim.adamw_hidden.to_dict() if optim.adamw_hidden else {}
    return dataclasses.replace(optim.adamw, **{k: v for k, v in given.items() if v is not None})


def build_optimizers(model: nn.Module, optimizer: str, optim: OptimSettings,
                     fused: bool = False) -> dict[str, torch.optim.Optimizer]:
    """One torch optimizer per non-empty group, keyed "muon"/"adamw"; ``fused``: AdamW's fused kernel.

    Both kinds of cell give the parameters outside the hidden matrices (embeddings, head, γ, 1-D) the same
    AdamW groups, from ``optim.adamw``; only the hidden 2-D matrices differ: Muon (``optim.muon``) in muon
    cells, AdamW with ``optim.adamw_hidden`` (unset: ``optim.adamw``) in adamw cells, as extra groups of the
    same AdamW after the shared ones. So an adamw cell changes the hidden matrices' optimizer and nothing else.
    """
    groups = split_parameters(model, optimizer)
    a = optim.adamw
    out: dict[str, torch.optim.Optimizer] = {}
    if "muon" in groups:
        m = optim.muon
        out["muon"] = torch.optim.Muon(
            [p for _, p in groups["muon"]], lr=m.lr, momentum=m.momentum, nesterov=m.nesterov,
            ns_steps=m.ns_steps, adjust_lr_fn=m.adjust_lr_fn, weight_decay=m.weight_decay)
    named = groups.get("adamw", [])
    hidden = [p for name, p in named if optimizer == "adamw" and is_hidden_matrix(name, p)]
    hidden_ids = {id(p) for p in hidden}
    param_groups = _adamw_groups([p for _, p in named if id(p) not in hidden_ids], a)
    for group in _adamw_groups(hidden, hidden_adamw(optim)):
        param_groups.append({**group, "hidden": True})
    if param_groups:
        out["adamw"] = torch.optim.AdamW(param_groups, lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps,
                                         fused=True if fused else None)
    for opt in out.values():
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return out


def lr_factor(tokens_seen: int, total_tokens: int, schedule: ScheduleSettings) -> float:
    """Multiplier of the base learning rate for the step that ends at ``tokens_seen`` tokens.

    Linear warmup (tokens_seen / warmup_tokens), then constant, linear or cosine decay to min_lr_ratio.
    """
    warmup = schedule.warmup_tokens
    if warmup and tokens_seen < warmup:
        return tokens_seen / warmup
    if schedule.decay == "constant" or total_tokens <= warmup:
        return 1.0
    progress = min(1.0, (tokens_seen - warmup) / (total_tokens - warmup))
    floor = schedule.min_lr_ratio
    if schedule.decay == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizers: dict[str, torch.optim.Optimizer], factor: float) -> dict[str, float]:
    """Apply the schedule factor; returns the learning rate now in force per group."""
    lrs = {}
    for name, opt in optimizers.items():
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        lrs[name] = opt.param_groups[0]["lr"]
    return lrs
