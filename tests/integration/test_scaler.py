"""The lag command and the KEDA external scaler against the embedded broker, over a real
gRPC channel and real HTTP, called as KEDA calls them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from spotbatch.kafka_admin import ensure_topics
from spotbatch.scaler.proto import externalscaler_pb2 as pb
from spotbatch.scaler.proto import externalscaler_pb2_grpc as pb_grpc
from spotbatch.scaler.service import LagSource, serve
from tests.integration.helpers import REPO_ROOT, make_jobs, new_group, publish, wait_until

pytestmark = pytest.mark.integration


def _one_batch(bootstrap: str, topic: str, n: int, partition: int) -> None:
    """n records in ONE producer batch (Tansu's ListOffsets then answers base offset + 1)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=60_000, batch_size=1 << 20)
    try:
        for i in range(n):
            producer.send(topic, f"r{i}".encode(), partition=partition)
        producer.flush(timeout=30)
    finally:
        producer.close()


def _commit(bootstrap: str, group: str, offsets: dict[tuple[str, int], int]) -> None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})
    finally:
        consumer.close()


def _lag_cli(bootstrap: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spotbatch", "lag", "--bootstrap", bootstrap, *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture
def scaler():
    server = serve(port=0, metrics_port=0, host="127.0.0.1", source=LagSource(cache_s=0.5,
                   usage_topic=f"usage-{uuid.uuid4().hex[:8]}"), stream_interval_s=0.2)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, pb_grpc.ExternalScalerStub(channel), channel
    channel.close()
    server.stop(grace_s=0)


def _ref(meta: dict[str, str]) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name="spotbatch-worker-spot", namespace="spotbatch", scalerMetadata=meta)


def test_lag_counts_a_multi_record_batch(kafka_bootstrap, topic):
    group = new_group()
    _one_batch(kafka_bootstrap, topic, 100, partition=2)
    _commit(kafka_bootstrap, group, {(topic, p): 0 for p in range(4)})
    done = _lag_cli(kafka_bootstrap, "--group", group, "--topic", topic, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["total_lag_with_persistent"] == 100  # the true count, not Tansu's ListOffsets answer
    assert [(p["partition"], p["log_end"], p["lag"]) for p in report["partitions"]] == \
        [(0, 0, 0), (1, 0, 0), (2, 100, 100), (3, 0, 0)]
    # 100 // 10 > 4 partitions: KEDA caps the metric at 4 x 10 and wants 4 replicas
    assert (report["total_lag"], report["active"], report["replicas"]) == (40, True, 4)
    table = _lag_cli(kafka_bootstrap, "--group", group, "--topic", topic)
    assert table.returncode == 0 and "total lag 40" in table.stdout and "replicas 4" in table.stdout


def test_lag_cli_errors_are_one_line(kafka_bootstrap, topic):
    # a group that has committed nothing: with --topic, its backlog (issue 13); without, one line
    unknown = _lag_cli(kafka_bootstrap, "--group", new_group())
    assert unknown.returncode == 2 and "unknown" in unknown.stderr and "--topic" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    group = new_group()
    _commit(kafka_bootstrap, group, {(topic, 0): 0})
    no_topic = _lag_cli(kafka_bootstrap, "--group", group, "--topic", f"missing-{uuid.uuid4().hex}")
    assert no_topic.returncode == 2 and "does not exist" in no_topic.stderr


def test_scaler_answers_like_keda_and_matches_lag_cli(kafka_bootstrap, topic, scaler):
    server, stub, channel = scaler
    group = new_group()
    _one_batch(kafka_bootstrap, topic, 25, partition=1)
    _commit(kafka_bootstrap, group, {(topic, p): 0 for p in range(4)})
    meta = {"bootstrapServers": kafka_bootstrap, "consumerGroup": group, "topic": topic, "lagThreshold": "10",
            "scalerAddress": "spotbatch-scaler.spotbatch:9090"}
    spec = stub.GetMetricSpec(_ref(meta)).metricSpecs[0]
    assert (spec.targetSizeFloat, spec.targetSize) == (10.0, 10)
    assert spec.metricName == f"spotbatch-lag-{topic}"
    value = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref(meta), metricName=spec.metricName)).metricValues[0]
    assert (value.metricName, value.metricValueFloat, value.metricValue) == (spec.metricName, 25.0, 25)
    assert stub.IsActive(_ref(meta)).result is True
    cli = json.loads(_lag_cli(kafka_bootstrap, "--group", group, "--topic", topic, "--json").stdout)
    assert cli["total_lag"] == value.metricValueFloat
    # KEDA sends the name with its s<index>- prefix removed; accept it with the prefix too
    again = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref(meta), metricName=f"s0-{spec.metricName}"))
    assert again.metricValues[0].metricValueFloat == 25.0

    _commit(kafka_bootstrap, group, {(topic, 1): 25})
    wait_until(lambda: not stub.IsActive(_ref(meta)).result, 10, "inactive once the group has consumed all")
    assert stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref(meta), metricName=spec.metricName)) \
        .metricValues[0].metricValueFloat == 0.0

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "externalscaler.ExternalScaler"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    base = f"http://127.0.0.1:{server.metrics_port}"
    assert urllib.request.urlopen(f"{base}/healthz", timeout=5).read() == b"ok\n"
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    assert 'spotbatch_scaler_calls_total{code="OK",method="GetMetrics"}' in metrics


def test_scaler_without_topic_counts_every_committed_topic(kafka_bootstrap, scaler):
    _, stub, _ = scaler
    a, b, group = f"t-{uuid.uuid4().hex}", f"t-{uuid.uuid4().hex}", new_group()
    ensure_topics(kafka_bootstrap, {a: 1, b: 1})
    _one_batch(kafka_bootstrap, a, 7, partition=0)
    _one_batch(kafka_bootstrap, b, 5, partition=0)
    _commit(kafka_bootstrap, group, {(a, 0): 2, (b, 0): 0})
    meta = {"bootstrapServers": kafka_bootstrap, "consumerGroup": group, "allowIdleConsumers": "true"}
    value = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref(meta))).metricValues[0]
    assert value.metricValueFloat == 10.0 and value.metricName == f"spotbatch-lag-{group}"


@pytest.mark.parametrize("meta,needle", [
    ({"consumerGroup": "g"}, "bootstrapServers"),
    ({"bootstrapServers": "x:1"}, "consumerGroup"),
    ({"bootstrapServers": "x:1", "consumerGroup": "g", "lagThreshold": "ten"}, "lagThreshold"),
    ({"bootstrapServers": "x:1", "consumerGroup": "g", "lagThreshold": "0"}, "lagThreshold must be > 0"),
    ({"bootstrapServers": "x:1", "consumerGroup": "g", "mode": "rows"}, "mode"),
    ({"bootstrapServers": "x:1", "consumerGroup": "g", "pool": "cheap"}, "pool"),
    ({"bootstrapServers": "x:1", "consumerGroup": "g", "mode": "work", "drainSeconds": "-5"}, "drainSeconds"),
])
def test_bad_metadata_is_invalid_argument(scaler, meta, needle):
    _, stub, _ = scaler
    with pytest.raises(grpc.RpcError) as info:
        stub.GetMetricSpec(_ref(meta))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details()


def test_pool_without_splitter_fails_precondition(kafka_bootstrap, topic, scaler):
    _, stub, _ = scaler
    group = new_group()
    _commit(kafka_bootstrap, group, {(topic, 0): 0})
    meta = {"bootstrapServers": kafka_bootstrap, "consumerGroup": group, "topic": topic, "pool": "spot"}
    with pytest.raises(grpc.RpcError) as info:
        stub.IsActive(_ref(meta))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "splitter" in info.value.details()


class _HalfSplitter:
    """A PoolSplitter: on-demand gets 1, spot gets the rest (records what it was asked)."""

    def __init__(self):
        self.asked = []

    def replicas(self, pool, desired_total, metadata):
        self.asked.append((pool, desired_total, dict(metadata)))
        return min(desired_total, 1) if pool == "on-demand" else max(desired_total - 1, 0)


def test_pool_share_is_served_as_share_times_target(kafka_bootstrap, topic):
    splitter = _HalfSplitter()
    server = serve(port=0, metrics_port=None, host="127.0.0.1", source=LagSource(splitter=splitter))
    try:
        stub = pb_grpc.ExternalScalerStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        group = new_group()
        _one_batch(kafka_bootstrap, topic, 35, partition=0)
        _commit(kafka_bootstrap, group, {(topic, p): 0 for p in range(4)})
        base = {"bootstrapServers": kafka_bootstrap, "consumerGroup": group, "topic": topic, "lagThreshold": "10"}
        spot = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref({**base, "pool": "spot"}))).metricValues[0]
        od = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref({**base, "pool": "on-demand"}))).metricValues[0]
        assert (spot.metricValueFloat, od.metricValueFloat) == (30.0, 10.0)  # 4 wanted: 3 spot + 1 on-demand
        assert spot.metricName.endswith("-spot") and od.metricName.endswith("-on-demand")
        assert ("spot", 4) == splitter.asked[0][:2] and splitter.asked[0][2]["pool"] == "spot"
    finally:
        server.stop(grace_s=0)


def test_work_mode_serves_pending_rows(kafka_bootstrap, topic, scaler):
    server, stub, _ = scaler
    group = new_group()
    publish(kafka_bootstrap, topic, make_jobs(6, 20))  # 120 rows
    _commit(kafka_bootstrap, group, {(topic, p): 0 for p in range(4)})
    meta = {"bootstrapServers": kafka_bootstrap, "consumerGroup": group, "topic": topic, "mode": "work",
            "rowsPerSecond": "2", "drainSeconds": "10"}
    spec = stub.GetMetricSpec(_ref(meta)).metricSpecs[0]
    assert (spec.metricName, spec.targetSizeFloat) == (f"spotbatch-work-{topic}", 20.0)  # default rate x drain
    value = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref(meta))).metricValues[0]
    assert value.metricValueFloat == 80.0  # 120 rows want 6 replicas; 4 partitions cap it at 4 x 20

    usage_topic = server.servicer.source._usage_topic
    record = {"v": 1, "kind": "usage", "record_id": "w1-1", "worker": "w1", "pool": "spot", "instance_type": "local",
              "gpus": 0, "start": time.time() - 60, "end": time.time(), "seconds_alive": 60.0, "seconds_busy": 10.0,
              "rows": 30, "jobs": 2, "interruptions": 0, "rows_recomputed": 0, "final": False, "at": time.time()}
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(usage_topic, json.dumps(record).encode(), key=b"w1")
    producer.flush()
    producer.close()
    wait_until(lambda: stub.GetMetricSpec(_ref(meta)).metricSpecs[0].targetSizeFloat == 30.0, 10,
               "target = learned 3 rows/s x 10 s")


def test_stream_is_active_pushes_changes(kafka_bootstrap, topic, scaler):
    _, stub, _ = scaler
    group = new_group()
    _commit(kafka_bootstrap, group, {(topic, p): 0 for p in range(4)})
    meta = {"bootstrapServers": kafka_bootstrap, "consumerGroup": group, "topic": topic}
    stream = stub.StreamIsActive(_ref(meta))
    seen = []

    def read() -> None:
        try:
            seen.extend(r.result for r in stream)
        except grpc.RpcError as exc:  # our own cancel at the end
            assert exc.code() == grpc.StatusCode.CANCELLED

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: seen == [False], 10, "the first answer: inactive")
    _one_batch(kafka_bootstrap, topic, 3, partition=0)
    wait_until(lambda: seen == [False, True], 10, "a push once lag appears")
    stream.cancel()


def test_concurrent_get_metrics_share_one_broker_read(kafka_bootstrap, topic):
    source = LagSource(cache_s=30.0)
    server = serve(port=0, metrics_port=None, host="127.0.0.1", source=source)
    try:
        stub = pb_grpc.ExternalScalerStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        group = new_group()
        _commit(kafka_bootstrap, group, {(topic, 0): 0})
        meta = {"bootstrapServers": kafka_bootstrap, "consumerGroup": group, "topic": topic}
        request = pb.GetMetricsRequest(scaledObjectRef=_ref(meta))
        with ThreadPoolExecutor(50) as pool:
            values = list(pool.map(lambda _: stub.GetMetrics(request).metricValues[0].metricValueFloat, range(50)))
        assert values == [3.0] * 50  # 3 partitions without a commit count 1 each (latest)
        assert source.broker_reads == 1
    finally:
        server.stop(grace_s=0)
