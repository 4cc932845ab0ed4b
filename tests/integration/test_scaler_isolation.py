"""One trigger's dead Kafka must not slow the others: the scaler over a real gRPC
channel, a socket that accepts and never answers as one trigger's bootstrapServers, the
embedded broker as the healthy one."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from spotbatch.scaler.proto import externalscaler_pb2 as pb
from spotbatch.scaler.proto import externalscaler_pb2_grpc as pb_grpc
from spotbatch.scaler.service import LagSource, serve
from tests.integration.helpers import new_group

pytestmark = pytest.mark.integration

CALL_TIMEOUT_S = 2.5  # below kafka_admin's own 5 s bootstrap timeout, so the per-call one is what answers


@pytest.fixture
def dead_bootstrap():
    """host:port of a listener that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    listener.close()


@pytest.fixture
def scaler():
    source = LagSource(cache_s=0.0, call_timeout_s=CALL_TIMEOUT_S, usage_topic=f"usage-{uuid.uuid4().hex[:8]}")
    server = serve(port=0, metrics_port=None, host="127.0.0.1", source=source)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.ExternalScalerStub(channel), source
    channel.close()
    server.stop(grace_s=0)


def _commit(bootstrap: str, group: str, topic: str) -> None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(0, "", -1) for p in range(4)})
    finally:
        consumer.close()


def _metrics(stub, bootstrap: str, group: str, topic: str, timeout: float = 60.0) -> float:
    meta = {"bootstrapServers": bootstrap, "consumerGroup": group, "topic": topic}
    request = pb.GetMetricsRequest(scaledObjectRef=pb.ScaledObjectRef(name="w", namespace="n", scalerMetadata=meta))
    return stub.GetMetrics(request, timeout=timeout).metricValues[0].metricValueFloat


def test_a_dead_bootstrap_does_not_slow_a_healthy_trigger(kafka_bootstrap, topic, scaler, dead_bootstrap):
    stub, source = scaler
    warm, fresh = new_group(), new_group()
    _commit(kafka_bootstrap, warm, topic)
    _commit(kafka_bootstrap, fresh, topic)
    assert _metrics(stub, kafka_bootstrap, warm, topic) == 0.0  # the healthy cluster's reader exists
    with ThreadPoolExecutor(1) as pool:
        t_dead = time.perf_counter()
        dead = pool.submit(_metrics, stub, dead_bootstrap, new_group(), topic)
        deadline = time.monotonic() + 5
        while not source._inflight and time.monotonic() < deadline:  # the dead read has begun
            time.sleep(0.01)
        assert source._inflight and not dead.done()
        t0 = time.perf_counter()
        assert _metrics(stub, kafka_bootstrap, fresh, topic) == 0.0  # a new group on the good cluster
        healthy_s = time.perf_counter() - t0
        assert not dead.done(), "the dead trigger's call should still be waiting"
        assert healthy_s < CALL_TIMEOUT_S / 2, f"healthy call took {healthy_s:.1f}s while a trigger hung"
        with pytest.raises(grpc.RpcError) as info:
            dead.result(60)
        dead_s = time.perf_counter() - t_dead
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dead_bootstrap in info.value.details() and "\n" not in info.value.details()
    assert CALL_TIMEOUT_S * 0.9 <= dead_s < CALL_TIMEOUT_S + 10  # bounded by the per-call timeout, not Kafka's 30 s


def test_a_closed_port_is_unavailable_for_that_trigger_only(kafka_bootstrap, topic, scaler):
    stub, _ = scaler
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    group = new_group()
    _commit(kafka_bootstrap, group, topic)
    with ThreadPoolExecutor(1) as pool:
        dead = pool.submit(_metrics, stub, closed, new_group(), topic)
        assert _metrics(stub, kafka_bootstrap, group, topic) == 0.0
        with pytest.raises(grpc.RpcError) as info:
            dead.result(60)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("bootstrap", ["", " ", "kafka", "kafka:", "kafka:port", "kafka:70000", "http://", "x" * 300])
def test_malformed_bootstrap_is_invalid_argument(scaler, bootstrap):
    stub, _ = scaler
    meta = {"bootstrapServers": bootstrap, "consumerGroup": "g", "topic": "t"}
    with pytest.raises(grpc.RpcError) as info:
        stub.GetMetricSpec(pb.ScaledObjectRef(name="w", namespace="n", scalerMetadata=meta), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bootstrapServers" in info.value.details() and len(info.value.details()) < 600
