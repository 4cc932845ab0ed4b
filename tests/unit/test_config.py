"""Settings precedence (flags > env > YAML > defaults) and one-line ConfigErrors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import spotbatch
from spotbatch.config import ConfigError, Environment, Settings, env_setting, load_settings


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
    assert s.max_batch_rows == 256
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
    assert load_settings().max_pending_rows == 16384  # 8 batches of 256, floored at 16384
    assert load_settings(max_batch_rows=4096).max_pending_rows == 32768
    assert load_settings(max_batch_rows=1024, max_pending_rows=2048).max_pending_rows == 2048


def test_pending_rows_below_one_batch_are_refused():
    with pytest.raises(ConfigError) as info:
        load_settings(max_batch_rows=1024, max_pending_rows=512)
    assert str(info.value).startswith("max_pending_rows (512) is below max_batch_rows (1024)")
    assert "\n" not in str(info.value)


def test_environment_reads_the_s3_endpoint_s3_name_first_and_empty_as_unset(monkeypatch):
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    assert (Environment().aws_endpoint_url, Environment().kubernetes_service_host) == (None, None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://any:1")
    assert Environment().aws_endpoint_url == "http://any:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "")  # empty falls through, as `a or b` did
    assert Environment().aws_endpoint_url == "http://any:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3:2")
    assert Environment().aws_endpoint_url == "http://s3:2"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert Environment().kubernetes_service_host == "10.0.0.1"


def test_call_sites_read_the_environment_when_called(monkeypatch):
    from spotbatch.scheduler.apply import _in_cluster
    from spotbatch.storage import _env_endpoint

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert (_in_cluster(), _env_endpoint()) == (False, None)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://moto:5000")
    assert (_in_cluster(), _env_endpoint()) == (True, "http://moto:5000")


def test_env_setting_reads_one_variable_none_when_unset(monkeypatch):
    assert env_setting("kafka_bootstrap") is None  # unset: not Settings' default
    monkeypatch.setenv("SPOTBATCH_KAFKA_BOOTSTRAP", "k:9092")
    monkeypatch.setenv("SPOTBATCH_MAX_BATCH_ROWS", "not a number")  # another variable's error is not ours
    assert env_setting("kafka_bootstrap") == "k:9092"
    monkeypatch.setenv("SPOTBATCH_SESSION_TIMEOUT_MS", "5")
    with pytest.raises(ConfigError, match="session_timeout_ms.*SPOTBATCH_SESSION_TIMEOUT_MS"):
        env_setting("session_timeout_ms")  # the field's bounds still hold


def test_metadata_urls_are_settings(monkeypatch):
    monkeypatch.setenv("SPOTBATCH_AWS_METADATA_URL", "http://fake:1")
    s = load_settings()
    assert (s.aws_metadata_url, s.gcp_metadata_url, s.azure_metadata_url) == ("http://fake:1", None, None)


# Reads, not copies: `{**os.environ, ...}` hands the environment on to a child process.
_ENV_READ = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[|\bin os\.environ\b|"
                       r"from os import [^\n]*\b(environ|getenv)\b")


def test_only_config_reads_the_environment():
    """Every variable goes through a class in spotbatch.config (Settings, Environment), so
    the names, types and defaults live in one place. spotbatch.testing (fakes) is exempt."""
    root = Path(spotbatch.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "config.py" or rel.startswith("testing/"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _ENV_READ.search(line):
                offenders.append(f"spotbatch/{rel}:{n}: {line.strip()}")
    assert not offenders, ("read these through a field of spotbatch.config.Settings (SPOTBATCH_*) or "
                           "Environment (others' variables):\n" + "\n".join(offenders))


def test_checkpoint_interval_is_typed_at_load_and_a_bad_one_names_its_key(clean_env):
    from spotbatch.interval_spec import IntervalSpec

    assert load_settings(checkpoint_interval="500rows").checkpoint_interval == IntervalSpec("rows", 500)
    assert load_settings(checkpoint_interval="90s").checkpoint_interval == IntervalSpec("seconds", 90.0)
    assert str(load_settings().checkpoint_interval) == "auto"
    assert load_settings(checkpoint_interval="90s").model_dump()["checkpoint_interval"] == "90s"  # round-trips
    with pytest.raises(ConfigError, match=r"checkpoint_interval.*bad checkpoint interval '12 parsecs'.*SPOTBATCH_CHECKPOINT_INTERVAL"):
        load_settings(checkpoint_interval="12 parsecs")


def test_yaml_takes_sections_as_well_as_flat_keys(tmp_path, clean_env):
    path = tmp_path / "spotbatch.yaml"
    path.write_text("kafka:\n  topic: jobs.eu\nbatching:\n  max_batch_rows: 4096\noutput: /data/out\n")
    settings = load_settings(path)
    assert (settings.topic, settings.max_batch_rows, settings.output) == ("jobs.eu", 4096, "/data/out")
    assert settings.max_pending_rows == 8 * 4096  # derived in the batching section from its own fields


@pytest.mark.parametrize("text, message", [
    ("kafka:\n  max_batch_rows: 3\n", r"kafka\.max_batch_rows is not a setting of section 'kafka'; it holds kafka_bootstrap"),
    ("topic: a\nkafka:\n  topic: b\n", r"topic is set twice, at the top and in section 'kafka'"),
    ("- topic\n", r"its top level is a list, not a mapping"),
])
def test_a_misplaced_section_key_is_one_line_naming_it(tmp_path, clean_env, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(path)
    assert "\n" not in str(info.value)


def test_every_setting_lives_in_exactly_one_section():
    from spotbatch.config import SECTIONS

    owners: dict[str, list[str]] = {}
    for name, section in SECTIONS.items():
        for key in section.model_fields:
            owners.setdefault(key, []).append(name)
    assert set(owners) == set(Settings.model_fields)
    assert {k: v for k, v in owners.items() if len(v) > 1} == {}
