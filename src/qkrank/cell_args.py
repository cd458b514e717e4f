"""The command-line options that name a cell's settings, shared by the train and probe jobs (torch-free)."""

from __future__ import annotations

import argparse

from qkrank import config as qconfig
from qkrank import identity


def settings_from_args(args) -> dict:
    if args.settings:
        raw = identity.load_cell_settings(args.settings)  # settings.json + runtime.json
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
