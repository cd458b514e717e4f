"""Typed settings: the dataclasses mirror the schema field for field, and build strictly from validated configs."""

from __future__ import annotations

import collections.abc
import dataclasses
import typing
from pathlib import Path

import pytest
from conftest import micro_config

from qkrank import config as qconfig
from qkrank.settings import (
    SCHEMA_POINTERS,
    AggregateSettings,
    CellInfo,
    CellSettings,
    DataSettings,
    GridSettings,
    ModelSettings,
    SettingsError,
    StudySettings,
    TrainSettings,
)

REPO = Path(__file__).resolve().parents[1]
STUDIES = [REPO / "config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
# Fields without a schema default that the config resolves itself (qkrank.config.cell_settings).
RESOLVED = {(TrainSettings, "val_every_tokens")}
# JSON schema type → the Python types a field's annotation must allow.
PY_TYPES = {"integer": int, "number": float, "boolean": bool, "string": str, "null": type(None),
            "array": tuple, "object": object}


def resolve(schema: dict, node: dict) -> dict:
    """``node`` with a ``$ref`` to ``#/$defs/...`` merged in (the referring keys win)."""
    return schema["$defs"][node["$ref"].rsplit("/", 1)[1]] | node if "$ref" in node else node


def schema_object(schema: dict, pointer: str) -> dict:
    node = schema
    for name in filter(None, pointer.split("/")):  # "" = the whole config
        node = node[name]
    return resolve(schema, node)


def allowed_types(prop: dict, schema: dict) -> set:
    prop = resolve(schema, prop)
    if "oneOf" in prop:
        return set().union(*(allowed_types(arm, schema) for arm in prop["oneOf"]))
    if "enum" in prop:
        return {type(v) for v in prop["enum"]}
    kinds = prop.get("type", "object")
    return {PY_TYPES[k] for k in ([kinds] if isinstance(kinds, str) else kinds)}


def annotation_types(tp) -> set:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return {tuple}
    if isinstance(origin, type) and issubclass(origin, collections.abc.Mapping):
        return {object}
    if args:
        return set().union(*(annotation_types(a) for a in args))
    return {object if dataclasses.is_dataclass(tp) else tp}


def item_types(prop: dict, schema: dict) -> set:
    """The Python types an array field's items may have (empty when the field is no array)."""
    prop = resolve(schema, prop)
    if "oneOf" in prop:
        return set().union(*(item_types(arm, schema) for arm in prop["oneOf"]))
    return allowed_types(prop["items"], schema) if "items" in prop else set()


def annotation_item_types(tp) -> set:
    """The item types a field's tuple annotation (tuple[X, ...], possibly in a union) allows."""
    if typing.get_origin(tp) is tuple:
        return annotation_types(typing.get_args(tp)[0])
    return set().union(*(annotation_item_types(a) for a in typing.get_args(tp)))


@pytest.mark.parametrize("cls", list(SCHEMA_POINTERS), ids=lambda c: c.__name__)
def test_fields_mirror_the_schema(cls):
    schema = qconfig.load_schema()
    node = schema_object(schema, SCHEMA_POINTERS[cls])
    properties = node["properties"]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(fields) == set(properties), f"{cls.__name__} vs schema {SCHEMA_POINTERS[cls]}"
    for name, prop in properties.items():
        prop_full = resolve(schema, prop)
        optional = "default" not in prop_full and name not in node.get("required", [])
        has_default = fields[name].default is not dataclasses.MISSING
        if (cls, name) in RESOLVED:
            assert optional and not has_default
        else:
            # Defaults live in the schema only; a field may default (to None) only where the schema has none.
            assert has_default == optional, f"{cls.__name__}.{name}"
            if has_default:
                assert fields[name].default is None
        want = allowed_types(prop, schema) | ({type(None)} if has_default else set())
        got = annotation_types(hints[name])
        if float in got:
            got.add(int)  # a JSON number may be written as 1
        assert want <= got, f"{cls.__name__}.{name}: annotation {got} lacks schema types {want}"
        want_items, got_items = item_types(prop, schema), annotation_item_types(hints[name])
        if float in got_items:
            got_items.add(int)
        assert want_items <= got_items, f"{cls.__name__}.{name}: items {got_items} lack schema types {want_items}"


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_every_cell_of_the_shipped_studies_round_trips(study):
    config = qconfig.load(study)
    for cell in qconfig.cells(config):
        settings = qconfig.cell_settings(config, cell)
        if qconfig.is_hf_scale(settings):
            continue  # a public suite is probed, never trained: it has no CellSettings
        typed = CellSettings.from_dict(settings)
        assert typed.to_dict() == settings
        assert typed.cell.id == cell.id and typed.train.tokens_per_step == qconfig.tokens_per_step(settings["train"])
        assert typed.data.num_proc is None  # a cell's data settings leave the worker count out
    data = DataSettings.from_dict(config["data"])
    assert data.to_dict() == config["data"] and data.num_proc == config["data"]["num_proc"]
    study = StudySettings.from_dict(config)
    assert study.to_dict() == config  # what qkrank.config resolves the aggregate side's cells from
    assert study.grid.modes == tuple(config["grid"]["modes"]) and study.results_dir == config["results_dir"]
    assert study.aggregate.site == config["aggregate"]["site"]
    assert study.aggregate.marks_tokens == tuple(config["aggregate"]["marks_tokens"])


def test_from_dict_rejects_unknown_and_missing_fields_by_name():
    config = qconfig.load(micro_config())
    settings = qconfig.cell_settings(config, qconfig.cells(config)[0])
    typo = {**settings, "train": {**settings["train"], "seq_lne": 64}}
    with pytest.raises(SettingsError, match=r"'settings.train.seq_lne': unknown key"):
        CellSettings.from_dict(typo)
    missing = {**settings, "optim": {**settings["optim"], "muon": {k: v for k, v in settings["optim"]["muon"].items()
                                                                  if k != "lr"}}}
    with pytest.raises(SettingsError, match=r"'settings.optim.muon.lr': missing"):
        CellSettings.from_dict(missing)
    with pytest.raises(SettingsError, match=r"'data.tokenizer': expected a mapping"):
        DataSettings.from_dict({**config["data"], "tokenizer": "bpe"})


def test_settings_are_frozen_and_model_overrides_are_only_those_given():
    config = qconfig.load(micro_config())
    typed = CellSettings.from_dict(qconfig.cell_settings(config, qconfig.cells(config)[0]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.train.seq_len = 1  # type: ignore[misc]
    assert typed.model == ModelSettings(preset="tiny", vocab_size=512, n_layers=2)
    assert typed.model.overrides() == {"vocab_size": 512, "n_layers": 2}
    assert isinstance(typed.data.hf.sources, tuple) and isinstance(typed.data.files.paths, tuple)


def test_the_config_is_validated_once(monkeypatch):
    calls = []
    original = qconfig._validated
    monkeypatch.setattr(qconfig, "_validated", lambda *a, **k: calls.append(a[2] if len(a) > 2 else "") or
                        original(*a, **k))
    override = "tiny/none/muon/seed0"
    config = qconfig.load(micro_config(cell_overrides={override: {"train": {"val_tokens": 128}}}))
    # The whole config once; the override once, merged over its scale (the schema pass saw it only partial).
    assert calls == ["", f"cell_overrides.{override}."]
    settings = [qconfig.cell_settings(config, cell) for cell in qconfig.cells(config)]
    assert len(calls) == 2  # resolving cells validates nothing again
    assert [s["train"]["val_tokens"] for s in settings] == [256, 256, 128]
    with pytest.raises(qconfig.ConfigError, match=rf"'cell_overrides.{override}.train.val_tokens'"):
        qconfig.load(micro_config(cell_overrides={override: {"train": {"val_tokens": 0}}}))


def test_every_settings_class_is_checked_against_the_schema():
    """A dataclass added to qkrank.settings without a schema pointer would escape test_fields_mirror_the_schema."""
    import qkrank.settings as module

    classes = {c for c in vars(module).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
               and c.__module__ == module.__name__}
    # A resolved cell (qkrank.config.cell_settings) is no schema object; the round-trip test above covers it.
    assert classes - set(SCHEMA_POINTERS) == {CellSettings, CellInfo}
    assert set(SCHEMA_POINTERS) <= classes


def test_a_misspelt_aggregate_key_is_named():
    config = qconfig.load(micro_config())
    typo = {**config, "aggregate": {**config["aggregate"], "ci_lvel": 0.9}}
    with pytest.raises(SettingsError, match=r"'aggregate.ci_lvel': unknown key"):
        StudySettings.from_dict(typo)
    with pytest.raises(SettingsError, match=r"'aggregate.ci_lvel': unknown key"):
        AggregateSettings.from_dict(typo["aggregate"])
    missing = {k: v for k, v in config["aggregate"].items() if k != "site"}
    with pytest.raises(SettingsError, match=r"'aggregate.site': missing"):
        StudySettings.from_dict({**config, "aggregate": missing})
    with pytest.raises(SettingsError, match=r"'grid.modes': missing"):
        GridSettings.from_dict({k: v for k, v in config["grid"].items() if k != "modes"})
    with pytest.raises(SettingsError, match=r"'config': expected a mapping"):
        StudySettings.from_dict(["not", "a", "config"])


def test_study_settings_are_built_once_and_passed_as_they_are():
    config = qconfig.load(micro_config())
    study = StudySettings.from_dict(config)
    assert StudySettings.from_dict(study) is study  # the aggregate entry points accept either
    assert isinstance(study.grid.seeds, tuple) and isinstance(study.aggregate.depths, tuple)
    assert isinstance(study.data, DataSettings) and study.data.num_proc == config["data"]["num_proc"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.aggregate.ci_level = 0.5  # type: ignore[misc]
