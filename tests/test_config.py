"""Config validation: defaults, cells, and bad values failing with the field named."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import REPO, micro_config, run_snakemake, write_config

from qkrank import config as qconfig
from qkrank import identity as identity_mod


def test_default_config_is_valid_and_has_three_modes():
    cfg = qconfig.load(REPO / "config.yaml")
    assert cfg["grid"]["modes"] == ["learned", "frozen", "none"]
    settings = qconfig.cell_settings(cfg, qconfig.cells(cfg)[0])
    marks = qconfig.checkpoint_tokens(settings)
    assert marks[0] == 0 and marks[-1] == settings["train"]["total_tokens"] and len(marks) >= 8
    # the keys collapse within the first 65,536 tokens: at least three probe points see it happen
    assert len([t for t in marks if 0 < t <= 65536]) >= 3


def test_defaults_are_filled_from_the_schema():
    cfg = qconfig.load(micro_config())
    settings = qconfig.cell_settings(cfg, qconfig.cells(cfg)[0])
    assert settings["optim"]["muon"]["momentum"] == 0.95
    assert settings["train"]["val_every_tokens"] == settings["train"]["checkpoint_every_tokens"]
    assert cfg["grid"]["optimizers"] == ["muon"]


def test_cell_ids_round_trip():
    cell = qconfig.Cell("tiny", "frozen", "adamw", 3)
    assert cell.id == "tiny/frozen/adamw/seed3"
    assert qconfig.Cell.parse(cell.id) == cell
    with pytest.raises(qconfig.ConfigError, match="scale/mode/optimizer/seedN"):
        qconfig.Cell.parse("tiny/frozen/seed3")


def _with(path: str, value):
    cfg = micro_config()
    *parents, leaf = path.split(".")
    node = cfg
    for key in parents:
        node = node[key]
    node[leaf] = value
    return cfg


BAD_CONFIGS = [
    # (description, config, text the message must contain)
    ("unknown mode", _with("grid.modes", ["learned", "sometimes"]), "grid.modes.1"),
    ("negative tokens", _with("scales.tiny.train.total_tokens", -4096), "scales.tiny.train.total_tokens"),
    ("non-integer tokens", _with("scales.tiny.train.total_tokens", 2048.5), "scales.tiny.train.total_tokens"),
    ("zero probe interval", _with("scales.tiny.train.checkpoint_every_tokens", 0),
     "scales.tiny.train.checkpoint_every_tokens"),
    ("negative probe interval", _with("scales.tiny.train.checkpoint_every_tokens", -512),
     "scales.tiny.train.checkpoint_every_tokens"),
    ("unknown scale in grid", _with("grid.scales", ["tiny", "huge"]), "grid.scales"),
    ("unknown preset", _with("scales.tiny.model.preset", "7b"), "scales.tiny.model.preset"),
    ("unknown optimizer", _with("grid.optimizers", ["sgd"]), "grid.optimizers.0"),
    ("interval not a multiple of a step", _with("scales.tiny.train.checkpoint_every_tokens", 700),
     "scales.tiny.train.checkpoint_every_tokens"),
    ("unknown top-level key", {**micro_config(), "sceles": {}}, "sceles"),
]


@pytest.mark.parametrize("description,cfg,field", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_names_the_field(description, cfg, field):
    with pytest.raises(qconfig.ConfigError) as err:
        qconfig.load(cfg)
    assert field in str(err.value), str(err.value)


def test_unknown_mode_lists_valid_values():
    with pytest.raises(qconfig.ConfigError) as err:
        qconfig.load(_with("grid.modes", ["sometimes"]))
    for valid in ("learned", "frozen", "none"):
        assert valid in str(err.value)


def test_unknown_scale_lists_defined_scales():
    with pytest.raises(qconfig.ConfigError, match=r"defined under 'scales': \['tiny'\]"):
        qconfig.load(_with("grid.scales", ["huge"]))


def test_interval_error_gives_nearest_valid_values():
    with pytest.raises(qconfig.ConfigError, match="nearest valid values: 512 or 768"):
        qconfig.load(_with("scales.tiny.train.checkpoint_every_tokens", 700))


def test_cell_override_is_validated_and_applied():
    cfg = micro_config(cell_overrides={"tiny/none/muon/seed0": {"optim": {"adamw": {"lr": 0.001}}}})
    loaded = qconfig.load(cfg)
    by_id = {c.id: qconfig.cell_settings(loaded, c) for c in qconfig.cells(loaded)}
    assert by_id["tiny/none/muon/seed0"]["optim"]["adamw"]["lr"] == 0.001
    assert by_id["tiny/learned/muon/seed0"]["optim"]["adamw"]["lr"] != 0.001
    bad = copy.deepcopy(cfg)
    bad["cell_overrides"]["tiny/none/muon/seed0"]["train"] = {"micro_batch": "four"}
    with pytest.raises(qconfig.ConfigError, match="cell_overrides.tiny/none/muon/seed0.train.micro_batch"):
        qconfig.load(bad)
    with pytest.raises(qconfig.ConfigError, match="not a cell of the grid"):
        qconfig.load(micro_config(cell_overrides={"tiny/none/muon/seed9": {}}))


@pytest.mark.parametrize("description,cfg,field", BAD_CONFIGS[:4], ids=[b[0] for b in BAD_CONFIGS[:4]])
def test_workflow_refuses_bad_config_before_any_job(tmp_path, description, cfg, field):
    configfile = write_config(tmp_path / "bad.yaml", cfg)
    proc = run_snakemake(tmp_path, configfile, "-n", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert field in output, output[-2000:]
    assert not (tmp_path / "results").exists()


def test_runtime_fields_exist_in_the_schema_and_split_off_cleanly():
    cfg = qconfig.load(micro_config())
    settings = qconfig.cell_settings(cfg, qconfig.cells(cfg)[0])
    identity, runtime = identity_mod.split_runtime(settings)
    scale_schema = qconfig.load_schema()["$defs"]["scale"]["properties"]
    for section, keys in identity_mod.RUNTIME_FIELDS.items():
        assert section in scale_schema
        for key in keys or ():
            assert key in scale_schema[section]["properties"], f"{section}.{key} is not a schema field"
            assert key not in identity[section] and key in runtime[section]
    assert "resources" not in identity and identity["cell"] == settings["cell"]
    assert qconfig.deep_merge(identity, runtime) == settings


def test_cell_settings_file_merges_its_runtime_file(tmp_path):
    cfg = qconfig.load(micro_config())
    settings = qconfig.cell_settings(cfg, qconfig.cells(cfg)[0])
    identity, runtime = identity_mod.split_runtime(settings)
    (tmp_path / "settings.json").write_text(json.dumps(identity))
    assert identity_mod.load_cell_settings(tmp_path / "settings.json") == identity
    (tmp_path / "runtime.json").write_text(json.dumps(runtime))
    assert identity_mod.load_cell_settings(tmp_path / "settings.json") == settings


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("grid:\n  scales: [tiny\n  modes: x\n")
    with pytest.raises(qconfig.ConfigError, match=rf"config file {path} is not valid YAML/JSON: line 3, column 8: "):
        qconfig.load(path)
