"""The `qkrank` command: `info` (preset sizes, from the meta device); `bench`, `verify`, `plan-seeds`,
`check-config` (delegated)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# Stage modules that own their own argument parsing; `qkrank NAME ...` hands them everything after NAME.
DELEGATED = {
    "bench": "benchmarks: training MFU, naive-attention ratio, probe cost, workflow overhead, GPU (qkrank.bench)",
    "verify": "integrity checks of every artifact; --fix deletes bad ones for the workflow to rebuild (qkrank.verify)",
    "plan-seeds": "seeds (and H100-hours) needed to resolve each pair of the verdict (qkrank.planner)",
    "check-config": "the workflow's load-time checks of config files, naming file, line and field "
                    "(qkrank.check_config)",
}
# delegated commands whose module is not named like the command
MODULES = {"plan-seeds": "planner", "check-config": "check_config"}
INFO_KEYS = ("n_params", "n_params_non_embedding", "n_params_embedding", "n_layers", "d_model", "n_heads",
             "n_kv_heads", "head_dim", "kv_dim", "d_ff", "vocab_size", "max_seq_len", "norm_mode",
             "tie_embeddings", "rope_base")
TABLE_COLUMNS = (("preset", "preset"), ("layers", "n_layers"), ("d_model", "d_model"), ("heads", "n_heads"),
                 ("KV heads", "n_kv_heads"), ("head dim", "head_dim"), ("MLP d_ff", "d_ff"),
                 ("vocab", "vocab_size"), ("context", "max_seq_len"), ("parameters", "n_params"),
                 ("non-embedding", "n_params_non_embedding"), ("source", "source"))


def human_count(n: int) -> str:
    """Three significant digits: 1579462656 -> '1.58B', 89196288 -> '89.2M', 722304 -> '722K'."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _parse_overrides(pairs: list[str]) -> dict:
    """`KEY=VALUE` strings -> ModelConfig overrides, each value parsed as the type of that field."""
    from qkrank.presets import PRESETS

    example = next(iter(PRESETS.values())).to_dict()
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in example:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {sorted(example)}")
        kind = type(example[key])
        try:
            out[key] = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
        except ValueError:
            raise ValueError(f"--set {pair!r}: {raw!r} is not a valid {kind.__name__}") from None
    return out


def preset_info(preset: str, mode: str = "learned", overrides: dict | None = None) -> dict:
    """Sizes and parameter counts of a preset; nothing is allocated (meta device)."""
    from qkrank.model import PRESET_SOURCES, ModelConfig, model_summary

    summary = model_summary(ModelConfig.from_preset(preset, norm_mode=mode, **(overrides or {})))
    return {"preset": preset, **{k: summary[k] for k in INFO_KEYS}, "source": PRESET_SOURCES[preset]}


def describe(info: dict) -> str:
    """A few human-readable lines about one preset."""
    group = info["n_heads"] // info["n_kv_heads"]
    sharing = f"GQA, {group} query heads share each" if group > 1 else "no GQA"
    return "\n".join([
        f"preset {info['preset']} (QK-norm mode {info['norm_mode']}): {info['source']}",
        f"  {info['n_layers']} layers, d_model {info['d_model']}, {info['n_heads']} query heads of "
        f"{info['head_dim']}, {info['n_kv_heads']} KV heads ({sharing}), kv_dim {info['kv_dim']}",
        f"  MLP d_ff {info['d_ff']}, vocab {info['vocab_size']}, context {info['max_seq_len']}, "
        f"tied embeddings {'yes' if info['tie_embeddings'] else 'no'}, RoPE base {info['rope_base']:g}",
        f"  parameters {info['n_params']:,} ({human_count(info['n_params'])}) = "
        f"{info['n_params_non_embedding']:,} non-embedding + {info['n_params_embedding']:,} embedding",
    ])


def markdown_table(infos: list[dict]) -> str:
    """One Markdown row per preset; parameter counts exact with a short form beside them."""
    def cell(info: dict, key: str) -> str:
        value = info[key]
        if key.startswith("n_params"):
            return f"{value:,} ({human_count(value)})"
        return str(value)

    lines = ["| " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(info, key) for _, key in TABLE_COLUMNS) + " |" for info in infos]
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    from qkrank.presets import PRESETS

    if args.table:
        infos = [preset_info(name, args.mode) for name in PRESETS]
        print(markdown_table(infos))
        if args.json:
            print(json.dumps(infos))
        return 0
    info = preset_info(args.preset, args.mode, _parse_overrides(args.set))
    print(describe(info))
    if args.json:
        print(json.dumps(info))
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    """Run qkrank.<command>.main(argv); imported only now, so `qkrank info` never depends on it."""
    module_name = f"qkrank.{MODULES.get(command, command)}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"qkrank {command}: module {module_name} is not part of this installation", file=sys.stderr)
        return 2
    result = module.main(argv)
    return result if isinstance(result, int) else 0


def build_parser() -> argparse.ArgumentParser:
    from qkrank.presets import NORM_MODES, PRESETS

    parser = argparse.ArgumentParser(
        prog="qkrank", description="QK-Norm, learned γ and the rank of attention keys: tools beside the workflow.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = commands.add_parser("info", help="sizes and parameter counts of a model preset (nothing allocated)",
                               description="Sizes and parameter counts of a preset, built on the meta device.")
    which = info.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=list(PRESETS), help="one preset")
    which.add_argument("--table", action="store_true", help="a Markdown table of every preset")
    info.add_argument("--mode", choices=NORM_MODES, default="learned",
                      help="QK-norm mode (frozen/none have no trainable γ: 2 × layers × head_dim fewer parameters)")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override one model field, e.g. --set n_kv_heads=8 (repeatable; with --preset)")
    info.add_argument("--json", action="store_true", help="also print the numbers as JSON on the last line")
    info.set_defaults(handler=_info)
    for name, help_text in DELEGATED.items():
        # Listed for --help only: main() hands `qkrank NAME ...` to the module before argparse sees it.
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.set and args.table:
        parser.error("--set applies to one --preset, not to --table")
    try:
        return args.handler(args)
    except ValueError as err:
        print(f"qkrank {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
