"""``python -m qkrank.data``: build the study's token shards from a config or the workflow's data JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qkrank import config as qconfig
from qkrank.data.common import DataError
from qkrank.data.manifest import prepare
from qkrank.settings import DataSettings, SettingsError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qkrank.data",
                                     description="Tokenize the study's corpus into token shards.")
    qconfig.add_config_args(parser)
    parser.add_argument("--data-json", help="only the config's data section, as JSON (what the workflow passes)")
    parser.add_argument("--num-proc", type=int, help="tokenizer processes (overrides data.num_proc)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    args = parser.parse_args(argv)
    try:
        # The workflow's JSON crosses a process boundary (and may be written by hand): validated here, once.
        section = qconfig.validate_data_section(json.loads(args.data_json)) if args.data_json \
            else qconfig.load_from_args(args)["data"]
        if args.num_proc:
            section["num_proc"] = args.num_proc
        manifest = prepare(DataSettings.from_dict(section), args.out)
    except (qconfig.ConfigError, SettingsError, DataError) as e:
        sys.exit(f"qkrank.data: error: {e}")
    print(json.dumps({"tokens": manifest["tokens"], "vocab_size": manifest["vocab_size"],
                      "sources": [{k: s[k] for k in ("label", "documents", "tokens")} for s in manifest["sources"]]}))
