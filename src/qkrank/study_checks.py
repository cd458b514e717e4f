"""Load-time checks of a whole study that no schema can express (``qkrank.config.load`` runs them): paths
the workflow hands to shell commands, non-empty source lists, layer indices, and cells that are compared
probed on the same batch."""

from __future__ import annotations

import re
from pathlib import Path

from qkrank.config import ConfigError

# A path the workflow writes under and hands to shell commands (quoted): letters, digits, space and . _ - / + , = @ : ~
_SAFE_PATH = re.compile(r"^[\w .,+=@:~/-]+$")


def check_paths(config: dict) -> None:
    """``results_dir`` holds no character that a shell, a glob or a Snakemake wildcard would interpret."""
    results = config["results_dir"]
    bad = sorted({c for c in results if not _SAFE_PATH.match(c)})
    if bad:
        raise ConfigError(f"config field 'results_dir': {results!r} contains {''.join(bad)!r}; use letters, digits, "
                          f"spaces and . _ - / + , = @ : ~ only")
    if ".." in Path(results).parts:
        raise ConfigError(f"config field 'results_dir': {results!r} climbs out with '..'; give a path below the "
                          f"working directory or an absolute one")


def check_sources(config: dict) -> None:
    """A corpus source that lists its inputs lists at least one."""
    data = config["data"]
    lists = {"files": ("data.files.paths", data["files"]["paths"]), "hf": ("data.hf.sources", data["hf"]["sources"])}
    if data["source"] in lists:
        field, items = lists[data["source"]]
        if not items:
            raise ConfigError(f"config field '{field}': empty, but data.source is {data['source']!r}; list at least "
                              f"one {'file or glob' if data['source'] == 'files' else 'dataset'}")


def check_depths(config: dict, settings: dict) -> None:
    """Every ``aggregate.depths`` index names a layer of every scale (negatives count from the end)."""
    from qkrank.presets import ModelConfig

    for cell, one in settings.items():
        fields = {k: v for k, v in one["model"].items() if k != "preset"}
        n_layers = ModelConfig.from_preset(one["model"]["preset"], **fields).n_layers
        for depth in config["aggregate"]["depths"]:
            if not -n_layers <= depth < n_layers:
                raise ConfigError(f"config field 'aggregate.depths': layer {depth} does not exist in scale "
                                  f"{cell.scale!r} ({n_layers} layers); use {-n_layers} … {n_layers - 1}")


def probe_batch_identity(settings: dict) -> dict:
    """What decides which tokens a cell is probed on, and the architecture they pass through (minus norm)."""
    probe = settings["probe"]
    return {"probe.n_sequences": probe["n_sequences"],
            "probe.seq_len": probe["seq_len"] or settings["train"]["seq_len"],
            **{f"model.{k}": v for k, v in sorted(settings["model"].items())}}


def check_comparable(config: dict, settings: dict) -> None:
    """Cells of one scale are compared (modes, optimizers, seeds averaged): they must share the probe batch and
    the architecture. A cell_override that breaks this is refused, naming it."""
    by_scale: dict[str, list] = {}
    for cell, one in settings.items():
        by_scale.setdefault(cell.scale, []).append((cell, probe_batch_identity(one)))
    for scale, members in by_scale.items():
        plain = [(c, ident) for c, ident in members if c.id not in config["cell_overrides"]] or members[:1]
        reference_cell, reference = plain[0]
        for cell, ident in members:
            diff = sorted(k for k in reference if ident.get(k) != reference[k])
            if diff:
                where = cell if cell.id in config["cell_overrides"] else reference_cell
                raise ConfigError(
                    f"config field 'cell_overrides.{where.id}': changes {', '.join(diff)} "
                    f"({', '.join(f'{ident[k]!r} vs {reference[k]!r}' for k in diff)}), so {cell.id} and "
                    f"{reference_cell.id} would be probed on different batches or architectures and compared; "
                    f"override these fields under scales.{scale} for every cell instead")


def check_data_fits(data: dict, settings: dict, where: str) -> None:
    """The model's vocabulary holds the tokenizer's, and capped splits hold one sequence of each use."""
    model_vocab = settings["model"].get("vocab_size")
    if model_vocab is None:
        from qkrank.presets import PRESETS

        model_vocab = PRESETS[settings["model"]["preset"]].vocab_size
    tokenizer = data["tokenizer"]
    needed = tokenizer["vocab_size"]
    if tokenizer["kind"] == "bpe" and model_vocab < needed:
        raise ConfigError(f"config field '{where}.model.vocab_size': {model_vocab} is smaller than "
                          f"data.tokenizer.vocab_size {needed}; use at least {needed}")
    train_len = settings["train"]["seq_len"]
    probe_len = settings["probe"]["seq_len"] or train_len
    for split, length, use in (("train", train_len, "train.seq_len"), ("val", max(train_len, probe_len),
                                                                       "train.seq_len / probe.seq_len")):
        cap = data[f"{split}_tokens"]
        if cap is not None and cap < length + 1:
            raise ConfigError(f"config field 'data.{split}_tokens': {cap} tokens cannot hold one sequence of "
                              f"{where}.{use} {length} (+1 target); use at least {length + 1} or null (all)")
