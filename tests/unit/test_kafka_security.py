"""Kafka security settings: validation, the kafka-python mapping, and that the clients
built from Settings really get the options. No SASL/TLS broker runs in the tests (the
embedded Tansu broker is PLAINTEXT), so the clients are stand-ins that record kwargs.
"""

from __future__ import annotations

import types

import pytest
from typer.testing import CliRunner

import spotbatch.cli.publish as cli
import spotbatch.kafka_admin as kafka_admin
import spotbatch.workers.broker as broker_mod
from spotbatch.config import ConfigError, load_settings
from spotbatch.kafka_security import client_options

SASL = {"kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_sasl_username": "svc", "kafka_sasl_password": "s3cret"}


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/conftest.py


@pytest.fixture
def pem(tmp_path):
    def make(name: str) -> str:
        path = tmp_path / name
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        return str(path)
    return make


# (flags, expected client_options); "{ca}" etc. become real files
VALID = [
    ({}, {}),
    ({"kafka_security_protocol": "PLAINTEXT"}, {}),
    # A shared Secret may feed credentials to a plaintext deployment: ignored, not an error.
    ({"kafka_sasl_username": "u", "kafka_sasl_password": "p"}, {}),
    ({"kafka_security_protocol": "SSL"}, {"security_protocol": "SSL"}),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "{ca}"},
     {"security_protocol": "SSL", "ssl_cafile": "{ca}"}),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "{ca}", "kafka_ssl_certfile": "{cert}",
      "kafka_ssl_keyfile": "{key}"},
     {"security_protocol": "SSL", "ssl_cafile": "{ca}", "ssl_certfile": "{cert}", "ssl_keyfile": "{key}"}),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN",
      "kafka_sasl_username": "u", "kafka_sasl_password": "p"},
     {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_plain_username": "u",
      "sasl_plain_password": "p"}),
    ({"kafka_security_protocol": "SASL_SSL", **SASL},
     {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "svc",
      "sasl_plain_password": "s3cret"}),
    ({"kafka_security_protocol": "SASL_SSL", **SASL, "kafka_sasl_mechanism": "SCRAM-SHA-256",
      "kafka_ssl_cafile": "{ca}"},
     {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "svc",
      "sasl_plain_password": "s3cret", "ssl_cafile": "{ca}"}),
]

# (flags, fragments the one-line error must contain)
INVALID = [
    ({"kafka_security_protocol": "TLS"}, ["kafka_security_protocol"]),
    ({"kafka_security_protocol": "SASL_SSL", **SASL, "kafka_sasl_mechanism": "GSSAPI"}, ["kafka_sasl_mechanism"]),
    ({"kafka_security_protocol": "SASL_SSL"},
     ["SASL_SSL needs kafka_sasl_mechanism, kafka_sasl_username, kafka_sasl_password", "SPOTBATCH_KAFKA_SASL_MECHANISM"]),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", **SASL, "kafka_sasl_password": ""},
     ["needs kafka_sasl_password", "SPOTBATCH_KAFKA_SASL_PASSWORD"]),
    ({"kafka_sasl_mechanism": "PLAIN"}, ["kafka_sasl_mechanism is set", "SASL_SSL or SASL_PLAINTEXT"]),
    ({"kafka_ssl_cafile": "{ca}"}, ["kafka_ssl_cafile is set", "SSL or SASL_SSL"]),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/no/such/ca.pem"},
     ["kafka_ssl_cafile /no/such/ca.pem does not exist", "SPOTBATCH_KAFKA_SSL_CAFILE"]),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "{key}"},
     ["kafka_ssl_keyfile needs kafka_ssl_certfile"]),
]


def _fill(value, pem):
    if isinstance(value, dict):
        return {k: _fill(v, pem) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return pem(value[1:-1] + ".pem")
    return value


@pytest.mark.parametrize(("flags", "expected"), VALID)
def test_client_options_maps_settings_to_kafka_python_keywords(flags, expected, pem):
    settings = load_settings(**_fill(flags, pem))
    assert client_options(settings) == _fill(expected, pem)


@pytest.mark.parametrize(("flags", "fragments"), INVALID)
def test_bad_security_settings_are_one_line_errors_that_say_the_fix(flags, fragments, pem):
    with pytest.raises(ConfigError) as info:
        load_settings(**_fill(flags, pem))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_client_option_names_are_kafka_python_keywords():
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    names = {"security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
             "ssl_cafile", "ssl_certfile", "ssl_keyfile"}
    for cls in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert names <= set(cls.DEFAULT_CONFIG), cls.__name__


def test_security_settings_load_from_env_and_yaml_and_the_password_never_prints(monkeypatch, tmp_path):
    monkeypatch.setenv("SPOTBATCH_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SPOTBATCH_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("SPOTBATCH_KAFKA_SASL_PASSWORD", "hunter2-secret")
    config = tmp_path / "spotbatch.yaml"
    config.write_text("kafka_sasl_mechanism: SCRAM-SHA-256\nkafka_sasl_username: from-yaml\n")
    settings = load_settings(config)
    assert (settings.kafka_sasl_mechanism, settings.kafka_sasl_username) == ("SCRAM-SHA-256", "svc")  # env > YAML
    assert "hunter2-secret" not in repr(settings) and "hunter2-secret" not in str(settings)
    assert client_options(settings)["sasl_plain_password"] == "hunter2-secret"


class Recorder:
    """Stands in for a kafka-python client class; records each construction's kwargs."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return types.SimpleNamespace(close=lambda *a, **k: None, poll=lambda **k: {})


def _sasl_settings():
    return load_settings(kafka_bootstrap="broker:9096", kafka_security_protocol="SASL_SSL", **SASL)


WANTED = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
          "sasl_plain_username": "svc", "sasl_plain_password": "s3cret"}


def test_worker_consumer_and_producer_get_the_options(monkeypatch):
    consumer, producer = Recorder(), Recorder()
    monkeypatch.setattr(broker_mod, "KafkaConsumer", consumer)
    monkeypatch.setattr(broker_mod, "KafkaProducer", producer)
    broker_mod.KafkaBroker().consumer(_sasl_settings(), "w-1")
    broker_mod.KafkaBroker().producer(_sasl_settings(), "w-1")
    for (kwargs,) in (consumer.calls, producer.calls):
        assert kwargs["bootstrap_servers"] == "broker:9096"
        assert WANTED.items() <= kwargs.items()


def test_worker_clients_are_unchanged_on_plaintext(monkeypatch):
    consumer = Recorder()
    monkeypatch.setattr(broker_mod, "KafkaConsumer", consumer)
    broker_mod.KafkaBroker().consumer(load_settings(), "w-1")
    assert not {"security_protocol", "sasl_mechanism", "ssl_cafile"} & set(consumer.calls[0])


def test_offset_reader_passes_the_options_to_both_clients(monkeypatch):
    admin, consumer = Recorder(), Recorder()
    monkeypatch.setattr(kafka_admin, "KafkaAdminClient", admin)
    monkeypatch.setattr(kafka_admin, "KafkaConsumer", consumer)
    kafka_admin.OffsetReader("broker:9096", client_options=client_options(_sasl_settings()))
    kafka_admin.OffsetReader("broker:9092")
    assert WANTED.items() <= admin.calls[0].items() and WANTED.items() <= consumer.calls[0].items()
    assert "security_protocol" not in admin.calls[1] and "security_protocol" not in consumer.calls[1]


def test_lag_verb_builds_its_reader_with_the_options(monkeypatch):
    from spotbatch.cli import app

    admin, consumer = Recorder(), Recorder()
    monkeypatch.setattr(kafka_admin, "KafkaAdminClient", admin)
    monkeypatch.setattr(kafka_admin, "KafkaConsumer", consumer)
    for key, value in {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-512",
                       "SASL_USERNAME": "svc", "SASL_PASSWORD": "s3cret"}.items():
        monkeypatch.setenv(f"SPOTBATCH_KAFKA_{key}", value)
    CliRunner().invoke(app, ["lag", "--group", "g", "--topic", "t", "--bootstrap", "broker:9096"])
    assert admin.calls and WANTED.items() <= admin.calls[0].items()


def test_publish_verb_builds_its_producer_with_the_options(monkeypatch, tmp_path):
    from spotbatch.cli import app

    producer = Recorder()
    monkeypatch.setattr(cli, "KafkaProducer", producer)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "1", "text": "hi"}\n')
    monkeypatch.setenv("SPOTBATCH_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SPOTBATCH_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("SPOTBATCH_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("SPOTBATCH_KAFKA_SASL_PASSWORD", "s3cret")
    CliRunner().invoke(app, ["publish", str(rows), "--bootstrap", "broker:9096"])
    (kwargs,) = producer.calls
    assert kwargs["bootstrap_servers"] == "broker:9096" and WANTED.items() <= kwargs.items()
