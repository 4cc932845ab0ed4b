"""Settings precedence (flags > env > YAML > defaults) and one-line ConfigErrors."""

from __future__ import annotations


import pytest

from spotbatch.config import ConfigError, Settings, load_settings


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/conftest.py


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "spotbatch.yaml"
    path.write_text(
        "topic: yaml-topic\n"
        "group: yaml-group\n"
        "max_batch_rows: 10\n"
        "max_wait_ms: 7\n"
        "model: tiny\n"
    )
    return path


def test_defaults():
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.topic == "spotbatch.jobs"
    assert s.max_batch_rows == 64
    assert s.max_wait_ms == 50


def test_yaml_via_config_argument(yaml_file):
    s = load_settings(config=yaml_file)
    assert (s.topic, s.group, s.max_batch_rows, s.max_wait_ms, s.model) == ("yaml-topic", "yaml-group", 10, 7, "tiny")
    assert s.precision == "auto"  # not in the file: default


def test_yaml_via_env(yaml_file, monkeypatch):
    monkeypatch.setenv("SPOTBATCH_CONFIG", str(yaml_file))
    s = load_settings()
    assert (s.topic, s.max_batch_rows) == ("yaml-topic", 10)


def test_config_argument_beats_env_config(yaml_file, tmp_path, monkeypatch):
    other = tmp_path / "other.yaml"
    other.write_text("topic: other-topic\n")
    monkeypatch.setenv("SPOTBATCH_CONFIG", str(other))
    assert load_settings(config=yaml_file).topic == "yaml-topic"
    assert load_settings().topic == "other-topic"


def test_precedence_flags_over_env_over_yaml(yaml_file, monkeypatch):
    monkeypatch.setenv("SPOTBATCH_MAX_BATCH_ROWS", "20")
    monkeypatch.setenv("SPOTBATCH_TOPIC", "env-topic")
    s = load_settings(config=yaml_file, max_batch_rows=30)
    assert s.max_batch_rows == 30  # flag > env > yaml
    assert s.topic == "env-topic"  # env > yaml
    assert s.group == "yaml-group"  # yaml > default
    assert s.max_wait_ms == 7
    assert s.drain_s == 25.0  # default


def test_precedence_with_env_config(yaml_file, monkeypatch):
    monkeypatch.setenv("SPOTBATCH_CONFIG", str(yaml_file))
    monkeypatch.setenv("SPOTBATCH_GROUP", "env-group")
    s = load_settings(topic="flag-topic")
    assert (s.topic, s.group, s.max_batch_rows) == ("flag-topic", "env-group", 10)


def test_flags_set_to_none_fall_through(yaml_file, monkeypatch):
    monkeypatch.setenv("SPOTBATCH_TOPIC", "env-topic")
    s = load_settings(config=yaml_file, topic=None, max_batch_rows=None)
    assert (s.topic, s.max_batch_rows) == ("env-topic", 10)


def test_config_argument_does_not_leak_into_later_calls(yaml_file):
    assert load_settings(config=yaml_file).topic == "yaml-topic"
    assert load_settings().topic == "spotbatch.jobs"


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("max_batch_row: 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config=path)
    msg = str(info.value)
    assert "'max_batch_row'" in msg
    assert "max_batch_rows" in msg  # the valid keys are listed as the fix
    assert "\n" not in msg


def test_unknown_flag_is_an_error():
    with pytest.raises(ConfigError, match="'no_such_setting'"):
        load_settings(no_such_setting=1)


@pytest.mark.parametrize("flags,flag", [
    ({"max_batch_rows": 0}, "--max-batch-rows"),
    ({"max_wait_ms": -1}, "--max-wait-ms"),
    ({"precision": "fp8"}, "--precision"),
    ({"metrics_port": 70000}, "--metrics-port"),
    ({"session_timeout_ms": 10}, "--session-timeout-ms"),
])
def test_invalid_flag_value_names_the_flag(flags, flag):
    with pytest.raises(ConfigError) as info:
        load_settings(**flags)
    msg = str(info.value)
    assert flag in msg
    assert "\n" not in msg


def test_invalid_env_value_names_the_setting(monkeypatch):
    monkeypatch.setenv("SPOTBATCH_MAX_WAIT_MS", "soon")
    with pytest.raises(ConfigError) as info:
        load_settings(max_wait_ms=None)  # a verb with the flag, not given
    assert "SPOTBATCH_MAX_WAIT_MS" in str(info.value)
    assert "--max-wait-ms" in str(info.value)


def test_invalid_yaml_value_names_the_setting(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_batch_rows: 0\n")
    with pytest.raises(ConfigError, match="max_batch_rows"):
        load_settings(config=path)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(config=missing)
    assert str(missing) in str(info.value)


def test_config_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError):
        load_settings(config=tmp_path)


def test_missing_config_file_named_by_env(tmp_path, monkeypatch):
    missing = tmp_path / "nope.yaml"
    monkeypatch.setenv("SPOTBATCH_CONFIG", str(missing))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("text", ["max_batch_rows: [\n", "- 1\n- 2\n"])
def test_unreadable_yaml_is_a_config_error(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config=path)
    assert str(path) in str(info.value) or "broken.yaml" in str(info.value)


def test_input_prefixes_from_env_flags_and_yaml(monkeypatch, tmp_path):
    monkeypatch.setenv("SPOTBATCH_INPUT_PREFIXES", " /data/in , s3://bkt/in/ ,")
    assert load_settings().input_prefixes == ["/data/in", "s3://bkt/in/"]
    assert load_settings(input_prefixes=["/other"]).input_prefixes == ["/other"]  # flags win
    monkeypatch.delenv("SPOTBATCH_INPUT_PREFIXES")
    config = tmp_path / "c.yaml"
    config.write_text("input_prefixes: [/a, s3://bkt/b/]\n")
    assert load_settings(config).input_prefixes == ["/a", "s3://bkt/b/"]
    assert load_settings().input_prefixes == []  # none: URI jobs are refused


def test_bad_input_prefix_names_the_flag(monkeypatch):
    monkeypatch.setenv("SPOTBATCH_INPUT_PREFIXES", "s3://Bad_Bucket/x")
    with pytest.raises(ConfigError, match="--input-prefix, env SPOTBATCH_INPUT_PREFIXES"):
        load_settings(input_prefixes=None)  # as the worker calls it: it has the flag, not given


def test_pending_rows_derive_from_the_batch_size():
    assert load_settings().max_pending_rows == 4096  # 8 batches of 64, floored at 4096
    assert load_settings(max_batch_rows=1024).max_pending_rows == 8192
    assert load_settings(max_batch_rows=1024, max_pending_rows=2048).max_pending_rows == 2048


def test_pending_rows_below_one_batch_are_refused():
    with pytest.raises(ConfigError) as info:
        load_settings(max_batch_rows=1024, max_pending_rows=512)
    assert str(info.value).startswith("max_pending_rows (512) is below max_batch_rows (1024)")
    assert "\n" not in str(info.value)
