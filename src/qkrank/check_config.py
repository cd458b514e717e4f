"""``qkrank check-config FILE...``: every check the workflow makes when it loads a study config, without
Snakemake.

Snakemake reads ``--configfile`` itself before the Snakefile runs, so a YAML syntax error there surfaces as
Snakemake's "Config file is not valid JSON or YAML" (no file, no line) and a missing file as a traceback;
this command names the file, line and column, then validates the schema, the study checks and the
cell settings exactly as the workflow does (qkrank.config, qkrank.verify.preflight).
"""

from __future__ import annotations

import argparse
import sys

from qkrank import config as qconfig


def check(path: str) -> str:
    """The workflow's load-time checks of one config file; returns a one-line description of the study."""
    from qkrank import verify

    study = qconfig.load(path)
    cells = qconfig.cells(study)
    for cell in cells:
        qconfig.cell_settings(study, cell)
    verify.preflight(study)
    return f"{path}: valid; {len(cells)} cells, scales {', '.join(study['grid']['scales'])}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qkrank check-config", description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="study config files (YAML or JSON)")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.configs:
        try:
            print(check(path))
        except qconfig.ConfigError as e:
            print(f"invalid config: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
