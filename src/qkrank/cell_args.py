"""The command-line options that name a cell's settings, shared by the train and probe jobs (torch-free)."""

from __future__ import annotations

import argparse

from qkrank import config as qconfig
from qkrank import identity
from qkrank.settings import CellSettings, SettingsError


def settings_from_args(args) -> CellSettings:
    """The cell's typed settings. ``--settings``: the settings.json (with runtime.json) that the workflow wrote
    from the config it validated, read as they are (their structure checked; validated once, not again in
    every job). ``--config`` and ``--cell``: that config validated and resolved here."""
    if args.settings:
        try:
            return CellSettings.from_dict(identity.load_cell_settings(args.settings))  # settings.json + runtime.json
        except SettingsError as e:
            raise qconfig.ConfigError(f"{args.settings}: {e}; the workflow writes this file from the config "
                                      f"(rule cell_settings): run snakemake again to rewrite it") from None
    config = qconfig.load(args.config)
    return CellSettings.from_dict(qconfig.cell_settings(config, qconfig.Cell.parse(args.cell)))


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(qconfig.DEFAULT_CONFIG_PATH), help="study config YAML")
    parser.add_argument("--cell", help="cell id scale/mode/optimizer/seedN (with --config)")
    parser.add_argument("--settings", help="a cell's resolved settings.json (what the workflow passes)")
