"""The `qkrank` command: help, `info` from the meta device, delegation, bad input, and the presets doc."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import REPO, env_with_src

from qkrank import cli
from qkrank.model import PRESETS, ModelConfig, model_summary


def qkrank_command() -> list[str]:
    """The installed console script when present (as CI installs it), else the same main() via -m."""
    script = shutil.which("qkrank", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "qkrank.cli"]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "bench", "verify"):
        assert f"\n    {command} " in out


def test_info_1_5b_json_subprocess_is_fast_and_right():
    start = time.perf_counter()
    proc = subprocess.run([*qkrank_command(), "info", "--preset", "1.5b", "--json"], capture_output=True,
                          text=True, env=env_with_src(), timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 60  # seconds, not the minutes (and ~6 GB) allocating 1.58B floats would take
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["n_params"] == 1_579_462_656
    assert info["n_params_non_embedding"] == 1_476_536_320
    assert info["n_params_embedding"] == 50257 * 2048
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"], info["d_model"],
            info["d_ff"], info["vocab_size"], info["max_seq_len"], info["kv_dim"]) == \
        (32, 16, 8, 128, 2048, 8192, 50257, 2048, 1024)
    assert "1,579,462,656" in proc.stdout  # the human summary comes first


def test_info_modes_and_overrides(capsys):
    assert cli.main(["info", "--preset", "88m", "--mode", "none", "--set", "n_kv_heads=8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = model_summary(ModelConfig.from_preset("88m", norm_mode="none", n_kv_heads=8))
    assert info["n_params"] == expected["n_params"] and info["n_kv_heads"] == 8 and info["norm_mode"] == "none"


@pytest.mark.parametrize(("argv", "message"), [
    (["info", "--preset", "2b"], "invalid choice: '2b' (choose from 'tiny', '88m', '1.5b')"),
    (["info", "--preset", "tiny", "--set", "width=3"], "--set 'width=3': expected KEY=VALUE with KEY one of"),
    (["info", "--preset", "tiny", "--set", "n_layers=x"], "'x' is not a valid int"),
    (["info", "--preset", "tiny", "--set", "n_heads=3"], "d_model 128 is not divisible by n_heads 3"),
    (["info"], "one of the arguments --preset --table is required"),
])
def test_bad_info_arguments_exit_nonzero_with_a_message(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as err:
        code = err.code
    assert code != 0
    assert message in capsys.readouterr().err


def test_bench_and_verify_hand_over_every_argument(monkeypatch):
    seen = {}

    def fake_main(name):
        def main(argv):
            seen[name] = argv
            return 3
        return main

    for name in cli.DELEGATED:
        fake = types.ModuleType(f"qkrank.{name}")
        fake.main = fake_main(name)
        monkeypatch.setitem(sys.modules, f"qkrank.{name}", fake)
    assert cli.main(["bench", "--preset", "tiny", "--help"]) == 3
    assert cli.main(["verify", "results", "-x"]) == 3
    assert seen == {"bench": ["--preset", "tiny", "--help"], "verify": ["results", "-x"]}


def test_presets_doc_holds_the_generated_table(capsys):
    assert cli.main(["info", "--table", "--json"]) == 0
    *table, last = capsys.readouterr().out.strip().splitlines()
    infos = json.loads(last)
    assert [info["preset"] for info in infos] == list(PRESETS)
    assert all(info["n_params"] == model_summary(ModelConfig.from_preset(info["preset"]))["n_params"]
               for info in infos)
    doc = (REPO / "docs" / "presets.md").read_text()
    assert "\n".join(table) in doc, "docs/presets.md is stale: paste the output of `qkrank info --table`"


@pytest.mark.parametrize(("overrides", "n_params"), [
    (dict(d_model=448, n_heads=7, n_kv_heads=7, d_ff=1792), 75_523_968),
    (dict(n_kv_heads=8), 94_963_456),
    ({}, 89_196_288),
    (dict(n_kv_heads=2), 86_312_704),
    (dict(d_model=576, n_heads=9, n_kv_heads=3, d_ff=2304), 106_833_536),
    (dict(d_model=576, n_heads=9, n_kv_heads=1, d_ff=2304), 103_589_504),
])
def test_presets_doc_88m_width_rationale_is_computed(overrides, n_params):
    assert model_summary(ModelConfig.from_preset("88m", **overrides))["n_params"] == n_params
    assert f"{n_params:,}" in (REPO / "docs" / "presets.md").read_text()


def test_check_config_names_file_line_and_field_where_snakemake_cannot(tmp_path):
    """Snakemake reads --configfile before qkrank: its "not valid JSON or YAML" names no file or line, and a
    missing file is a traceback. `qkrank check-config` (the README's answer) names them."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  seeds: [0, 1\n  modes: [learned]\n")
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text((REPO / "config.yaml").read_text().replace("val_fraction:", "val_fractoin:"))
    cmd = [*qkrank_command(), "check-config"]
    env = env_with_src()
    proc = subprocess.run([*cmd, str(bad), str(tmp_path / "missing.yaml"), str(misspelt)], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"invalid config: config file {bad} is not valid YAML/JSON: line 3, column 8"), lines
    assert lines[1] == f"invalid config: config file {tmp_path / 'missing.yaml'} does not exist"
    assert "'data.val_fractoin'" in lines[2] and "valid keys here" in lines[2], lines
    good = subprocess.run([*cmd, str(REPO / "config.yaml")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert good.returncode == 0 and "valid; 9 cells, scales tiny" in good.stdout, good.stderr
