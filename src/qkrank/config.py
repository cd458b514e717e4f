"""The study config: schema validation with defaults, semantic checks, cells and their settings."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from qkrank import schedule

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG_PATH = REPO_ROOT / "config.yaml"


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what would be valid."""


@dataclass(frozen=True, order=True)
class Cell:
    scale: str
    mode: str
    optimizer: str
    seed: int

    @property
    def id(self) -> str:
        """``{scale}/{mode}/{optimizer}/seed{seed}``: also the cell's directory under runs/."""
        return f"{self.scale}/{self.mode}/{self.optimizer}/seed{self.seed}"

    @classmethod
    def parse(cls, cell_id: str) -> Cell:
        parts = cell_id.strip("/").split("/")
        if len(parts) != 4 or not parts[3].startswith("seed") or not parts[3][4:].isdigit():
            raise ConfigError(f"cell id {cell_id!r} is not of the form scale/mode/optimizer/seedN")
        return cls(parts[0], parts[1], parts[2], int(parts[3][4:]))


def load_schema() -> dict:
    """The parsed schema, a fresh copy each call (parsing it is the slow part, so it is parsed once)."""
    return copy.deepcopy(_parsed_schema())


@functools.lru_cache(maxsize=1)
def _parsed_schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def _extend_with_default(validator_class):
    """A validator that also fills in schema defaults (the jsonschema FAQ recipe, as Snakemake does)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "$ref" in sub:
                    sub = validator._resolver.lookup(sub["$ref"]).contents | sub
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    import jsonschema

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


@functools.cache
def _defaulting_validator():
    # jsonschema is imported here, not with the module: a job that reads a settings.json the workflow already
    # validated never pays for it (≈ 0.1 s of each job's start-up).
    import jsonschema

    return _extend_with_default(jsonschema.Draft202012Validator)


def _field_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<config>"


def _validated(instance: dict, schema: dict, prefix: str = "") -> dict:
    """A deep copy of ``instance`` with defaults filled in; raises ConfigError naming the field."""
    out = copy.deepcopy(instance)
    validator = _defaulting_validator()(schema)
    # Two passes: the first fills defaults of objects that themselves were defaulted.
    for _ in range(2):
        errors = sorted(validator.iter_errors(out), key=lambda e: list(e.absolute_path))
        if errors:
            error = errors[0]
            field = prefix + _field_path(error)
            known = error.schema.get("properties")
            if error.validator == "additionalProperties" and known and isinstance(error.instance, dict):
                # Name the unknown key itself, and the keys that would be valid in its place.
                unknown = sorted(k for k in error.instance if k not in known)[0]
                field = f"{field}.{unknown}" if error.absolute_path else prefix + unknown
                raise ConfigError(f"config field '{field}': unknown key; valid keys here: {sorted(known)}")
            raise ConfigError(f"config field '{field}': {error.message}")
    return out


def validate_schema(raw: dict) -> dict:
    """A validated copy of the whole config with schema defaults filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping, got {type(raw).__name__}")
    return _validated(raw, load_schema())


def validate_data_section(data: dict) -> dict:
    """The ``data`` section alone, validated with defaults (what the data stage receives)."""
    schema = load_schema()
    return _validated(data, {"$defs": schema["$defs"], **schema["properties"]["data"]}, "data.")


def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: ``update`` merged over ``base``, recursively for nested mappings."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def is_hf_scale(scale: dict) -> bool:
    """A public checkpoint suite (``model.hf``): probed, never trained (qkrank.suites)."""
    return "hf" in scale.get("model", {})


def cells(config: dict) -> list[Cell]:
    """The grid's cells; an hf scale has one cell, {scale}/{its architecture's mode}/pretrained/seed0."""
    from qkrank import suites

    grid = config["grid"]
    out = []
    for s in grid["scales"]:
        scale = config["scales"].get(s, {})
        if is_hf_scale(scale):
            mode = suites.ARCHITECTURES[scale["model"]["architecture"]].mode
            out.append(Cell(s, mode, suites.OPTIMIZER, suites.SEED))
        else:
            out += [Cell(s, m, o, seed) for m in grid["modes"] for o in grid["optimizers"] for seed in grid["seeds"]]
    return out


def tokens_per_step(train: dict) -> int:
    return train["micro_batch"] * train["grad_accum"] * train["seq_len"]


def _nearest_multiples(value: int, step: int, minimum: int) -> str:
    """The valid values nearest to ``value`` (multiples of ``step``, at least ``minimum``), as text."""
    below = value // step * step
    return " or ".join(str(v) for v in (below, below + step) if v >= minimum)


def _check_scale(where: str, settings: dict) -> None:
    """Semantic checks the schema cannot express; ``where`` prefixes field names in messages."""
    from qkrank.presets import ModelConfig  # torch import deferred: config checks stay light

    train = settings["train"]
    step = tokens_per_step(train)
    if "checkpoint_every_tokens" not in train and "checkpoints" not in train:
        raise ConfigError(f"config field '{where}.train': give checkpoint_every_tokens or checkpoints "
                          f"(snapshot points; docs/training.md)")
    warmup = settings["optim"]["schedule"]["warmup_tokens"]
    token_counts = {"train.total_tokens": (train["total_tokens"], 1),
                    "train.checkpoint_every_tokens": (train.get("checkpoint_every_tokens"), 1),
                    "optim.schedule.warmup_tokens": (warmup, 0)}
    token_counts = {k: v for k, v in token_counts.items() if v[0] is not None}
    for name, (value, minimum) in token_counts.items():
        if value % step:
            raise ConfigError(
                f"config field '{where}.{name}': {value} is not a multiple of tokens per optimizer step "
                f"(micro_batch {train['micro_batch']} × grad_accum {train['grad_accum']} × seq_len "
                f"{train['seq_len']} = {step}); nearest valid values: {_nearest_multiples(value, step, minimum)}")
    every = train.get("checkpoint_every_tokens")
    if every is not None and train["total_tokens"] % every:
        runs = train["total_tokens"] // every
        raise ConfigError(
            f"config field '{where}.train.total_tokens': {train['total_tokens']} is not a whole number of "
            f"checkpoint intervals (checkpoint_every_tokens {every}), so the last probe interval would differ; "
            f"nearest valid values: {' or '.join(str(n * every) for n in (runs, runs + 1) if n > 0)}")
    try:
        marks = schedule.checkpoint_tokens(train.get("checkpoints"), every, train["total_tokens"], step,
                                           f"{where}.train")
    except schedule.ScheduleError as e:
        raise ConfigError(str(e)) from None
    train.setdefault("val_every_tokens", train.get("checkpoint_every_tokens")
                     or train.get("checkpoints", {}).get("every") or train["total_tokens"])
    if train["val_every_tokens"] % step:
        raise ConfigError(
            f"config field '{where}.train.val_every_tokens': {train['val_every_tokens']} is not a multiple of tokens "
            f"per optimizer step ({step}); nearest valid values: "
            f"{_nearest_multiples(train['val_every_tokens'], step, 1)}")
    keep = train["keep_snapshots"]
    for i, tokens in enumerate(keep if isinstance(keep, list) else []):
        if tokens not in marks:
            nearest = sorted(marks, key=lambda m: (abs(m - tokens), m))[:2]
            raise ConfigError(f"config field '{where}.train.keep_snapshots[{i}]': {tokens} is not a snapshot point; "
                              f"nearest valid values: {' or '.join(map(str, sorted(nearest)))}")
    if warmup > train["total_tokens"]:
        raise ConfigError(f"config field '{where}.optim.schedule.warmup_tokens': {warmup} exceeds "
                          f"train.total_tokens {train['total_tokens']}")
    if train["micro_batch"] % train["nproc"]:
        raise ConfigError(f"config field '{where}.train.micro_batch': {train['micro_batch']} is not divisible "
                          f"by train.nproc {train['nproc']} (micro_batch is global across processes)")
    model_fields = {k: v for k, v in settings["model"].items() if k != "preset"}
    try:
        model = ModelConfig.from_preset(settings["model"]["preset"], **model_fields)
    except ValueError as e:
        raise ConfigError(f"config field '{where}.model': {e}") from None
    probe_len = settings["probe"]["seq_len"] or train["seq_len"]
    for name, length in (("train.seq_len", train["seq_len"]), ("probe.seq_len", probe_len)):
        if length > model.max_seq_len:
            raise ConfigError(f"config field '{where}.{name}': {length} exceeds the model's max_seq_len "
                              f"{model.max_seq_len}; use at most {model.max_seq_len} or set model.max_seq_len")


def load_json(path: str | Path) -> dict:
    """A JSON file written by the workflow (study config or cell settings)."""
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------ what can change a cell's results
# Knobs that change how fast or where a job runs, never its numbers. They reach the jobs through
# runtime.json beside settings.json, which is no rerun trigger: raising a time limit must not retrain.
def load(source: str | Path | dict | None = None) -> dict:
    """Read (path or mapping), validate, fill defaults and check a study config."""
    if source is None:
        source = DEFAULT_CONFIG_PATH
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                # PyYAML reads JSON's 1e-08 as a string, so the workflow's config.json is read as JSON.
                raw = json.load(f) if path.suffix == ".json" else (yaml.safe_load(f) or {})
            except (yaml.YAMLError, json.JSONDecodeError) as e:
                raise ConfigError(f"config file {path} is not valid YAML/JSON: {_syntax_error(e)}") from None
    else:
        raw = source
    config = validate_schema(raw)  # the one schema pass: it fills the defaults of every scale too
    for scale in config["grid"]["scales"]:
        if scale not in config["scales"]:
            raise ConfigError(f"config field 'grid.scales': unknown scale {scale!r}; "
                              f"defined under 'scales': {sorted(config['scales'])}")
    marks_from, marks = config["aggregate"]["marks_from"], config["aggregate"]["marks_tokens"]
    if marks_from and len(marks_from) != len(marks):
        raise ConfigError(f"config field 'aggregate.marks_from': {len(marks_from)} entries for {len(marks)} "
                          f"marks_tokens; give one scale per mark, or none")
    for i, scale in enumerate(marks_from):
        if scale not in config["grid"]["scales"]:
            raise ConfigError(f"config field 'aggregate.marks_from[{i}]': {scale!r} is not a scale of the grid; "
                              f"valid values: {config['grid']['scales']}")
    valid_ids = {c.id for c in cells(config)}
    for cell_id in config["cell_overrides"]:
        if cell_id not in valid_ids:
            raise ConfigError(f"config field 'cell_overrides.{cell_id}': not a cell of the grid; "
                              f"cells: {sorted(valid_ids)}")
    # Semantic checks once per distinct settings: each scale that some cell uses as is, and each overridden
    # cell (the only settings the schema pass has not seen whole: an override is partial, so it is checked
    # merged over its scale).
    from qkrank import study_checks  # imports this module

    schema = load_schema()
    plain_scales = dict.fromkeys(c.scale for c in cells(config) if c.id not in config["cell_overrides"])
    distinct = [(f"scales.{scale}", scale, None) for scale in plain_scales]
    distinct += [(f"cell_overrides.{cell_id}", Cell.parse(cell_id).scale, cell_id)
                 for cell_id in config["cell_overrides"]]
    for where, scale, cell_id in distinct:
        settings = _merged(config, scale, cell_id)
        kind = "hf_scale" if is_hf_scale(settings) else "scale"
        if cell_id is not None:
            _validated(settings, {"$defs": schema["$defs"], **schema["$defs"][kind]}, where + ".")
        if kind == "hf_scale":
            _check_hf_scale(where, settings)
        else:
            _check_scale(where, settings)
            study_checks.check_data_fits(config["data"], settings, where)
    study_checks.check_paths(config)
    study_checks.check_sources(config)
    trained = {cell: cell_settings(config, cell) for cell in cells(config)
               if not is_hf_scale(config["scales"][cell.scale])}
    study_checks.check_depths(config, trained)
    study_checks.check_comparable(config, trained)
    return config


def _syntax_error(error: Exception) -> str:
    """A YAML or JSON syntax error in one line, with its line and column (1-based)."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno}, column {error.colno}: {error.msg}"
    return " ".join(str(error).split())


def add_config_args(parser) -> None:
    """``--config PATH``: a study YAML, or the effective config.json the workflow writes."""
    parser.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="study config (YAML or JSON)")


def load_from_args(args) -> dict:
    return load(args.config)


def _merged(config: dict, scale: str, cell_id: str | None) -> dict:
    """A scale with a cell's override merged over it, and the one default the schema cannot state."""
    settings = deep_merge(config["scales"][scale], config["cell_overrides"].get(cell_id, {}))
    if "train" in settings:
        train = settings["train"]
        train.setdefault("val_every_tokens", train.get("checkpoint_every_tokens")
                         or train.get("checkpoints", {}).get("every") or train["total_tokens"])
    return settings


def cell_settings(config: dict, cell: Cell) -> dict:
    """Everything that determines one cell's training and probes, fully resolved.

    ``config`` comes from ``load``, which has validated and checked every cell's settings: nothing is
    validated again here (an hf scale's revision schedule is resolved here, as ``settings["schedule"]``).
    """
    settings = _merged(config, cell.scale, cell.id)
    if is_hf_scale(settings):
        where = f"cell_overrides.{cell.id}" if cell.id in config["cell_overrides"] else f"scales.{cell.scale}"
        _check_hf_scale(where, settings)
    settings["cell"] = {"scale": cell.scale, "mode": cell.mode, "optimizer": cell.optimizer,
                        "seed": cell.seed, "id": cell.id}
    # num_proc changes how fast the data is built, not its bytes: it must not retrain a cell.
    settings["data"] = {k: v for k, v in config["data"].items() if k != "num_proc"}
    return settings


def _check_hf_scale(where: str, settings: dict) -> None:
    """An hf scale: each revision's tokens are known and distinct, and the probe's seq_len is given."""
    from qkrank import suites

    try:
        settings["schedule"] = suites.schedule(settings["model"], where)
    except suites.SuiteError as e:
        field, _, why = str(e).partition(": ")
        raise ConfigError(f"config field '{field}': {why}") from None
    if settings["probe"]["seq_len"] is None:
        raise ConfigError(f"config field '{where}.probe.seq_len': required for an hf scale (there is no "
                          f"train.seq_len); at most the model's context, e.g. 2048 for Pythia")


def checkpoint_tokens(settings: dict) -> list[int]:
    """Tokens seen at each snapshot: 0, the schedule's points (qkrank.schedule), and the end (an hf scale:
    each revision's)."""
    if "schedule" in settings:
        return [entry["tokens"] for entry in settings["schedule"]]
    train = settings["train"]
    return schedule.checkpoint_tokens(train.get("checkpoints"), train.get("checkpoint_every_tokens"),
                                      train["total_tokens"], tokens_per_step(train))


def kept_snapshot_tokens(settings: dict) -> list[int]:
    """Snapshots that outlive their probe (``train.keep_snapshots``); the final one always."""
    marks, keep = checkpoint_tokens(settings), settings["train"].get("keep_snapshots", "final")
    if keep == "all":
        return marks
    return sorted({marks[-1], *(keep if isinstance(keep, list) else [])})


def config_hash(obj) -> str:
    """Short sha256 of a JSON-serialisable object with sorted keys."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def training_identity(settings: dict) -> dict:
    """The parts of a cell's settings that change its trained weights (not resources or probes)."""
    # A muon cell never reads adamw_hidden: setting it for the adamw cells of a scale must not retrain these.
    unused = "adamw_hidden" if settings["cell"]["optimizer"] == "muon" else None
    return {k: settings[k] for k in ("cell", "model", "train", "optim", "data")} | {
        "optim": {k: v for k, v in settings["optim"].items() if k != unused}} | {
        "train": {k: v for k, v in settings["train"].items()
                  if k not in ("threads", "keep_resume_checkpoints", "keep_snapshots", "log_every_steps", "device")}}
