"""Typed settings: frozen dataclasses built once from a validated config (``qkrank.config``).

Each class mirrors one object of ``workflow/schemas/config.schema.yaml`` field for field (a test checks
this both ways). Defaults live in the schema only: ``from_dict`` takes a section the schema has already
filled in and rejects a missing or unknown key, naming it. The one exception is a field the schema leaves
optional without a default (the ``model`` overrides of a preset): it is ``None`` when not given.

Torch-free, like ``qkrank.config``: the workflow builds these while it parses.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields


class SettingsError(ValueError):
    """A settings mapping does not match its dataclass; the message names the field."""


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _convert(tp, value, where: str):
    """``value`` as type ``tp``: nested dataclasses built, lists made tuples; scalars pass through unchanged."""
    if _is_dataclass_type(tp):
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, (list, tuple)):
        item_type = typing.get_args(tp)[0]
        return tuple(_convert(item_type, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if _is_dataclass_type(arm) and isinstance(value, Mapping):
                return _build(arm, value, where)
    return value


def _build(cls, data, where: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise SettingsError(f"settings field '{where or 'config'}': expected a mapping, got {type(data).__name__}")

    def field(name: str) -> str:  # the whole config (where == "") names its sections without a prefix
        return f"{where}.{name}" if where else name

    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SettingsError(f"settings field '{field(unknown[0])}': unknown key; valid keys: {sorted(names)}")
    values = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING:
                raise SettingsError(f"settings field '{field(f.name)}': missing (is the config validated?)")
            continue
        values[f.name] = _convert(_hints(cls)[f.name], data[f.name], field(f.name))
    return cls(**values)


class _Section:
    """Shared constructors: ``from_dict`` (strict) and ``to_dict`` (plain JSON-ready mapping)."""

    SECTION = ""

    @classmethod
    def from_dict(cls, data: Mapping, where: str | None = None):
        return _build(cls, data, cls.SECTION if where is None else where)

    def to_dict(self) -> dict:
        return _plain(self)


def _plain(value):
    if dataclasses.is_dataclass(value):
        # A field that may be left out of the config (default None) is left out again when it was.
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)
                if not (f.default is None and getattr(value, f.name) is None)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- per-scale sections ($defs/scale)

@dataclass(frozen=True)
class ModelSettings(_Section):
    """A preset and the fields that override it (``None``: the preset's value)."""

    SECTION = "model"
    preset: str
    vocab_size: int | None = None
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    d_ff: int | None = None
    max_seq_len: int | None = None
    rope_base: float | None = None
    norm_eps: float | None = None
    tie_embeddings: bool | None = None
    init_std: float | None = None

    def overrides(self) -> dict:
        """The fields given in the config: keyword arguments for ``ModelConfig.from_preset``."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "preset" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class LogSchedule(_Section):
    SECTION = "train.checkpoints.log"
    first: int
    per_decade: int
    until: int | None


@dataclass(frozen=True)
class CheckpointSchedule(_Section):
    """Snapshot points (qkrank.schedule): explicit tokens, every N, log-spaced; any of them may be left out."""

    SECTION = "train.checkpoints"
    tokens: tuple[int, ...] | None = None
    every: int | None = None
    log: LogSchedule | None = None


@dataclass(frozen=True)
class TrainSettings(_Section):
    SECTION = "train"
    seq_len: int
    micro_batch: int
    grad_accum: int
    total_tokens: int
    keep_snapshots: str | tuple[int, ...]
    val_every_tokens: int  # no schema default: qkrank.config fills in the snapshot interval
    val_tokens: int
    log_every_steps: int
    grad_clip: float | None
    device: str
    bf16: str | bool
    compile: str | bool
    tf32: str | bool
    fused: str | bool
    nproc: int
    threads: int | None
    keep_resume_checkpoints: int
    checkpoint_every_tokens: int | None = None  # give this, checkpoints, or both
    checkpoints: CheckpointSchedule | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.seq_len


@dataclass(frozen=True)
class MuonSettings(_Section):
    SECTION = "optim.muon"
    lr: float
    momentum: float
    nesterov: bool
    ns_steps: int
    adjust_lr_fn: str | None
    weight_decay: float


@dataclass(frozen=True)
class AdamWSettings(_Section):
    SECTION = "optim.adamw"
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


@dataclass(frozen=True)
class ScheduleSettings(_Section):
    SECTION = "optim.schedule"
    warmup_tokens: int
    decay: str
    min_lr_ratio: float


@dataclass(frozen=True)
class AdamWHiddenSettings(_Section):
    """adamw cells' hidden matrices; a field left out falls back to optim.adamw."""

    SECTION = "optim.adamw_hidden"
    lr: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    weight_decay: float | None = None


@dataclass(frozen=True)
class OptimSettings(_Section):
    SECTION = "optim"
    muon: MuonSettings
    adamw: AdamWSettings
    schedule: ScheduleSettings
    adamw_hidden: AdamWHiddenSettings | None = None


@dataclass(frozen=True)
class ProbeSettings(_Section):
    SECTION = "probe"
    n_sequences: int
    seq_len: int | None
    chunk_sequences: int
    save_activations: str | bool
    device: str


@dataclass(frozen=True)
class JobResources(_Section):
    """One job's resources ($defs/resources)."""

    SECTION = "resources"
    gpus: int
    cpus: int
    mem_mb: int
    runtime: int
    slurm_partition: str | None
    slurm_extra: str | None


@dataclass(frozen=True)
class ResourcesSettings(_Section):
    SECTION = "resources"
    train: JobResources
    probe: JobResources


# ---------------------------------------------------------------- data (top-level ``data``)

@dataclass(frozen=True)
class TokenizerSettings(_Section):
    SECTION = "data.tokenizer"
    kind: str
    vocab_size: int
    name_or_path: str | None


@dataclass(frozen=True)
class HFSource(_Section):
    SECTION = "data.hf.sources[]"
    path: str
    name: str | None
    split: str
    text_column: str
    weight: float
    data_dir: str | None
    revision: str | None

    @property
    def label(self) -> str:
        return self.path + (f":{self.name}" if self.name else "")


@dataclass(frozen=True)
class HFSettings(_Section):
    SECTION = "data.hf"
    sources: tuple[HFSource, ...]


@dataclass(frozen=True)
class FilesSettings(_Section):
    SECTION = "data.files"
    paths: tuple[str, ...]
    format: str
    text_column: str


@dataclass(frozen=True)
class DataSettings(_Section):
    SECTION = "data"
    source: str
    val_fraction: float
    train_tokens: int | None
    val_tokens: int | None
    seed: int
    # None in a cell's settings: the worker count changes how fast the data is built, not its bytes, so it
    # is left out of a cell (qkrank.config.cell_settings); the data stage always has a number.
    num_proc: int | None
    shuffle_buffer: int
    tokenizer: TokenizerSettings
    hf: HFSettings
    files: FilesSettings

    def identity(self) -> dict:
        """The fields that determine the prepared bytes (everything but ``num_proc``)."""
        return {k: v for k, v in self.to_dict().items() if k != "num_proc"}


# ---------------------------------------------------------------- one cell

@dataclass(frozen=True)
class CellInfo(_Section):
    SECTION = "cell"
    scale: str
    mode: str
    optimizer: str
    seed: int
    id: str


@dataclass(frozen=True)
class CellSettings(_Section):
    """One cell, as ``qkrank.config.cell_settings`` resolves it (the workflow's ``settings.json``)."""

    SECTION = "settings"
    cell: CellInfo
    model: ModelSettings
    train: TrainSettings
    optim: OptimSettings
    probe: ProbeSettings
    resources: ResourcesSettings
    data: DataSettings

    @classmethod
    def from_dict(cls, data: Mapping, where: str | None = None) -> CellSettings:
        data = dict(data)
        if isinstance(data.get("data"), Mapping) and "num_proc" not in data["data"]:
            data["data"] = {**data["data"], "num_proc": None}
        return _build(cls, data, where or cls.SECTION)

    def to_dict(self) -> dict:
        out = _plain(self)
        out["data"].pop("num_proc")
        return out

    @functools.cached_property
    def plain(self) -> dict:
        """``to_dict()``, once: the mapping (settings.json) that the workflow's torch-free helpers take
        (qkrank.config's schedule and rerun identity, qkrank.snapshots)."""
        return self.to_dict()

    @classmethod
    def of(cls, settings: CellSettings | Mapping) -> CellSettings:
        """Typed settings from either form (a stage's entry point accepts both)."""
        return settings if isinstance(settings, cls) else cls.from_dict(settings)


# ---------------------------------------------------------------- the whole study (aggregate side)

@dataclass(frozen=True)
class GridSettings(_Section):
    SECTION = "grid"
    scales: tuple[str, ...]
    modes: tuple[str, ...]
    optimizers: tuple[str, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class AggregateSettings(_Section):
    """What the aggregation reports (qkrank.aggregate, qkrank.summary, the seeds planner)."""

    SECTION = "aggregate"
    marks_tokens: tuple[int, ...]
    marks_from: tuple[str, ...]
    depths: tuple[int, ...]
    ci_level: float
    top_fraction: float
    site: str
    verdict_margin: float
    verdict_alpha: float
    planner_power: float


@dataclass(frozen=True)
class StudySettings(_Section):
    """A whole validated config (``qkrank.config.load``), as the aggregate side reads it.

    ``scales`` and ``cell_overrides`` stay the schema-filled mappings: a cell's settings are resolved from
    them by ``qkrank.config.cell_settings`` (an hf scale has another shape), given ``to_dict()``.
    """

    SECTION = ""
    results_dir: str
    grid: GridSettings
    data: DataSettings
    scales: Mapping[str, Mapping]
    cell_overrides: Mapping[str, Mapping]
    aggregate: AggregateSettings


# The schema object each class mirrors, as a JSON pointer into workflow/schemas/config.schema.yaml.
_SCALE, _DATA = "/$defs/scale/properties", "/properties/data/properties"
SCHEMA_POINTERS: dict[type, str] = {
    ModelSettings: f"{_SCALE}/model",
    TrainSettings: f"{_SCALE}/train",
    OptimSettings: f"{_SCALE}/optim",
    MuonSettings: f"{_SCALE}/optim/properties/muon",
    AdamWSettings: f"{_SCALE}/optim/properties/adamw",
    AdamWHiddenSettings: f"{_SCALE}/optim/properties/adamw_hidden",
    CheckpointSchedule: f"{_SCALE}/train/properties/checkpoints",
    LogSchedule: f"{_SCALE}/train/properties/checkpoints/properties/log",
    ScheduleSettings: f"{_SCALE}/optim/properties/schedule",
    ProbeSettings: f"{_SCALE}/probe",
    ResourcesSettings: f"{_SCALE}/resources",
    JobResources: "/$defs/resources",
    DataSettings: "/properties/data",
    TokenizerSettings: f"{_DATA}/tokenizer",
    HFSettings: f"{_DATA}/hf",
    HFSource: f"{_DATA}/hf/properties/sources/items",
    FilesSettings: f"{_DATA}/files",
    GridSettings: "/properties/grid",
    AggregateSettings: "/properties/aggregate",
    StudySettings: "",
}
