"""The embedded broker and the kafka_admin helpers against a real broker."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import UnknownTopicOrPartitionError
from kafka.structs import OffsetAndMetadata

from spotbatch import embedded
from spotbatch.embedded import BOOTSTRAP_ENV, EmbeddedBroker, ExternalBroker, start_or_external
from spotbatch.kafka_admin import (
    committed_offsets,
    ensure_topics,
    log_end_offsets,
    partition_count,
    read_all,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
N_RECORDS = 200
PARTITIONS = 4


def _produce_batched(bootstrap: str, topic: str, n: int) -> None:
    """n records round-robin over the partitions; linger packs many records per batch."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=200, batch_size=1 << 20)
    try:
        for i in range(n):
            producer.send(topic, key=b"k%d" % i, value=b"v%d" % i, partition=i % PARTITIONS)
        producer.flush(timeout=10)
    finally:
        producer.close()


def _port_open(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_broker_starts_answers_and_stops():
    broker = EmbeddedBroker().start()
    pid, bootstrap = broker.pid, broker.bootstrap
    try:
        name = f"test-{uuid.uuid4().hex}"
        assert ensure_topics(bootstrap, {name: 2}) == {name: 2}
        assert broker.is_running() and _port_open(bootstrap)
    finally:
        broker.stop()
    broker.stop()  # idempotent
    assert not broker.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not _port_open(bootstrap)


def test_start_or_external_prefers_given_then_env(monkeypatch):
    monkeypatch.setenv(BOOTSTRAP_ENV, "kafka.example:9092")
    assert start_or_external() == ExternalBroker("kafka.example:9092")
    assert start_or_external("other:9093").bootstrap == "other:9093"


def test_log_end_offsets_count_every_record_of_linger_batches(kafka_bootstrap, topic):
    # Tansu's ListOffsets(latest) reports 1 per partition here (one batch each); the
    # fetch-corrected answer must be the true end.
    _produce_batched(kafka_bootstrap, topic, N_RECORDS)
    ends = log_end_offsets(kafka_bootstrap, topic)
    assert ends == {p: N_RECORDS // PARTITIONS for p in range(PARTITIONS)}
    assert sum(ends.values()) == N_RECORDS


def test_read_all_returns_every_record_once(kafka_bootstrap, topic):
    _produce_batched(kafka_bootstrap, topic, N_RECORDS)
    records = read_all(kafka_bootstrap, topic, timeout_s=30)
    assert sorted(r.value for r in records) == sorted(b"v%d" % i for i in range(N_RECORDS))
    assert {r.partition for r in records} == set(range(PARTITIONS))


def test_committed_offsets_reflect_explicit_commit(kafka_bootstrap, topic):
    _produce_batched(kafka_bootstrap, topic, 40)
    group = f"g-{uuid.uuid4().hex}"
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group,
                             enable_auto_commit=False, session_timeout_ms=6000)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(7, "", -1),
                         TopicPartition(topic, 2): OffsetAndMetadata(3, "", -1)})
    finally:
        consumer.close()
    assert committed_offsets(kafka_bootstrap, group, topic) == {0: 7, 2: 3}
    assert committed_offsets(kafka_bootstrap, group, "some-other-topic") == {}
    assert committed_offsets(kafka_bootstrap, f"g-{uuid.uuid4().hex}", topic) == {}


def test_ensure_topics_is_idempotent(kafka_bootstrap, topic):
    other = f"test-{uuid.uuid4().hex}"
    wanted = {topic: PARTITIONS, other: 3}
    assert ensure_topics(kafka_bootstrap, wanted) == wanted
    assert ensure_topics(kafka_bootstrap, wanted) == wanted
    assert partition_count(kafka_bootstrap, other) == 3
    with pytest.raises(ValueError, match="fewer partitions"):
        ensure_topics(kafka_bootstrap, {other: 5})


def test_partition_count_of_missing_topic_raises(kafka_bootstrap):
    with pytest.raises(UnknownTopicOrPartitionError):
        partition_count(kafka_bootstrap, f"missing-{uuid.uuid4().hex}")


def _python(*args: str, **kwargs) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_taken_port_fails_clearly_instead_of_using_the_other_listener():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = EmbeddedBroker(port=port)
        with pytest.raises(RuntimeError, match=f"port {port} .* already in use"):
            broker.start()
    assert not broker.is_running()


def test_forgotten_broker_is_stopped_at_interpreter_exit():
    script = ("from spotbatch.embedded import EmbeddedBroker\n"
              "b = EmbeddedBroker().start()\n"
              "print(b.pid, b.bootstrap, flush=True)\n")
    proc = _python("-c", script)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    pid, bootstrap = out.split()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)
    assert not _port_open(bootstrap)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_forever_stops_cleanly_on_signal(sig):
    proc = _python("-m", "spotbatch.embedded")
    try:
        line = proc.stdout.readline()
        bootstrap = re.search(r"on (127\.0\.0\.1:\d+)", line).group(1)
        assert _port_open(bootstrap)
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.communicate()
    assert not _port_open(bootstrap)


def test_broker_that_dies_at_start_up_reports_its_log_tail(tmp_path, monkeypatch):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(embedded, "_broker_bin", lambda: str(fake))
    with pytest.raises(RuntimeError, match="(?s)exited during start-up.*exit code 3.*boom"):
        EmbeddedBroker().start()
