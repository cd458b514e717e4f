"""Snapshot schedules in tokens: explicit, every N and log-spaced points, snapped to optimizer steps."""

from __future__ import annotations

import pytest
from conftest import micro_config

from qkrank import config as qconfig
from qkrank.schedule import ScheduleError, checkpoint_tokens, log_points, snap

STEP = 256


def test_every_alone_is_the_old_interval_with_zero_and_the_end():
    assert checkpoint_tokens(None, 512, 2048, STEP) == [0, 512, 1024, 1536, 2048]
    assert checkpoint_tokens({"every": 768}, None, 2048, STEP) == [0, 768, 1536, 2048]


def test_explicit_points_snap_to_the_nearest_step_and_zero_and_end_are_always_there():
    marks = checkpoint_tokens({"tokens": [300, 383, 384, 1000]}, None, 2048, STEP)
    # 300 → 256, 383 → 256 (1.496 steps), 384 → 512 (a tie rounds up), 1000 → 1024
    assert marks == [0, 256, 512, 1024, 2048]


def test_log_points_are_geometric_and_snapped():
    assert log_points(1000, 1, 10**5) == [1000, 10**4, 10**5]
    assert log_points(1000, 2, 10**4) == pytest.approx([1000, 3162.277660, 10**4])
    marks = checkpoint_tokens({"log": {"first": 256, "per_decade": 4}}, None, 10 * 256 * 100, STEP)
    expected = {0, 256000} | {snap(256 * 10 ** (k / 4), STEP) for k in range(13)}
    assert marks == sorted(expected)
    assert all(m % STEP == 0 for m in marks)


def test_a_mix_is_the_union_and_log_stops_at_until():
    marks = checkpoint_tokens({"every": 1024, "tokens": [100], "log": {"first": 256, "per_decade": 1, "until": 3000}},
                              None, 4096, STEP)
    assert marks == [0, 256, 1024, 2048, 2560, 3072, 4096]  # 2560 = log's 2560, 100 snaps to 0


def test_dense_log_points_collapse_onto_whole_steps_without_duplicates():
    marks = checkpoint_tokens({"log": {"first": 256, "per_decade": 40, "until": 1024}}, None, 1024, STEP)
    assert marks == [0, 256, 512, 768, 1024]


@pytest.mark.parametrize(("schedule", "every", "field", "nearest"), [
    ({"every": 700}, None, "train.checkpoints.every", "512 or 768"),
    ({"every": 100}, None, "train.checkpoints.every", "256"),
    (None, 600, "train.checkpoint_every_tokens", "512 or 768"),
    ({"tokens": [0, 5000]}, None, "train.checkpoints.tokens[1]", "2048"),
    ({"log": {"first": 100, "per_decade": 2}}, None, "train.checkpoints.log.first", "256"),
    ({"log": {"first": 3000, "per_decade": 2}}, None, "train.checkpoints.log.first", "2048"),
    ({"log": {"first": 256, "per_decade": 2, "until": 9999}}, None, "train.checkpoints.log.until", "2048"),
])
def test_impossible_schedules_name_the_field_and_the_nearest_valid_values(schedule, every, field, nearest):
    with pytest.raises(ScheduleError) as e:
        checkpoint_tokens(schedule, every, 2048, STEP)
    assert f"'{field}'" in str(e.value) and f"nearest valid values: {nearest}" in str(e.value)


def _config(train: dict) -> dict:
    cfg = micro_config()
    base = cfg["scales"]["tiny"]["train"]
    base.pop("checkpoint_every_tokens")
    base.update(train)
    return cfg


def test_the_study_config_uses_the_schedule_and_names_the_scale_in_errors():
    cfg = qconfig.load(_config({"checkpoints": {"tokens": [300], "log": {"first": 512, "per_decade": 1}}}))
    settings = qconfig.cell_settings(cfg, qconfig.cells(cfg)[0])
    assert qconfig.checkpoint_tokens(settings) == [0, 256, 512, 2048]
    assert settings["train"]["val_every_tokens"] == 2048  # no interval given: validation at the snapshots only
    with pytest.raises(qconfig.ConfigError, match=r"'scales\.tiny\.train\.checkpoints\.every'.*512 or 768"):
        qconfig.load(_config({"checkpoints": {"every": 700}}))
    with pytest.raises(qconfig.ConfigError, match=r"'scales\.tiny\.train': give checkpoint_every_tokens"):
        qconfig.load(_config({}))
    with pytest.raises(qconfig.ConfigError, match=r"'scales\.tiny\.train\.checkpoints\.log\.per_decade'"):
        qconfig.load(_config({"checkpoints": {"log": {"first": 512, "per_decade": 0}}}))


def test_keep_snapshots_defaults_to_final_and_names_a_point_off_the_schedule():
    cfg = qconfig.load(micro_config())
    settings = qconfig.cell_settings(cfg, qconfig.cells(cfg)[0])
    assert settings["train"]["keep_snapshots"] == "final"
    assert qconfig.kept_snapshot_tokens(settings) == [2048]
    settings["train"]["keep_snapshots"] = [512]
    assert qconfig.kept_snapshot_tokens(settings) == [512, 2048]
    settings["train"]["keep_snapshots"] = "all"
    assert qconfig.kept_snapshot_tokens(settings) == [0, 512, 1024, 1536, 2048]
    bad = micro_config()
    bad["scales"]["tiny"]["train"]["keep_snapshots"] = [600]
    with pytest.raises(qconfig.ConfigError, match=r"keep_snapshots\[0\]'.*nearest valid values: 512 or 1024"):
        qconfig.load(bad)


def test_keep_snapshots_does_not_change_the_training_identity():
    cfg = qconfig.load(micro_config())
    settings = qconfig.cell_settings(cfg, qconfig.cells(cfg)[0])
    other = {**settings, "train": {**settings["train"], "keep_snapshots": "all"}}
    assert qconfig.training_identity(settings) == qconfig.training_identity(other)
