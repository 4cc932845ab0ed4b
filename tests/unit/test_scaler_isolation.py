"""Trigger isolation in the external scaler, with fake offset readers (no broker):
a hanging Kafka costs only its own triggers, bounded by call_timeout_s."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from spotbatch.scaler.proto import externalscaler_pb2 as pb
from spotbatch.scaler.proto import externalscaler_pb2_grpc as pb_grpc
from spotbatch.scaler.service import (
    LagSource,
    MetadataError,
    Unavailable,
    bootstrap_servers,
    parse_metadata,
    serve,
)

GOOD, DEAD = "good:9092", "dead:9092"


class FakeReader:
    def __init__(self, bootstrap: str, release: threading.Event | None = None) -> None:
        self.bootstrap = bootstrap
        self.release = release  # set: answers; clear: every call hangs until set
        self.lag = 5
        self.closed = False

    def _wait(self) -> None:
        if self.release is not None:
            self.release.wait(60)

    def group_committed(self, group):
        self._wait()
        return {("t", 0): 0}

    def log_ends(self, topics):
        self._wait()
        return {("t", 0): self.lag}

    def close(self):
        self.closed = True


class Factory:
    """Readers per bootstrap; DEAD's constructor hangs until ``unblock`` is set."""

    def __init__(self) -> None:
        self.unblock = threading.Event()
        self.made: dict[str, FakeReader] = {}

    def __call__(self, bootstrap: str) -> FakeReader:
        if bootstrap == DEAD:
            self.unblock.wait(60)
        self.made[bootstrap] = FakeReader(bootstrap)
        return self.made[bootstrap]


def _req(bootstrap: str, group: str = "g"):
    return parse_metadata({"bootstrapServers": bootstrap, "consumerGroup": group, "topic": "t"})


def test_a_hanging_reader_construction_blocks_no_other_cluster():
    factory = Factory()
    source = LagSource(cache_s=0, reader_factory=factory, call_timeout_s=5.0)
    try:
        with ThreadPoolExecutor(2) as pool:
            dead = pool.submit(source.reading, _req(DEAD))
            time.sleep(0.2)  # the dead read is in its reader's constructor
            t0 = time.perf_counter()
            assert source.reading(_req(GOOD, "new-group")).total_lag == 5
            assert time.perf_counter() - t0 < 2.5  # half the dead call's timeout
            assert not dead.done()
            with pytest.raises(Unavailable, match="within 5s"):
                dead.result(30)
    finally:
        factory.unblock.set()
        source.close()


def test_timeout_serves_the_last_answer_then_unavailable_when_stale():
    release = threading.Event()
    release.set()
    now = [0.0]
    reader = FakeReader(DEAD, release)
    source = LagSource(cache_s=0, reader_factory=lambda b: reader, call_timeout_s=0.2, stale_s=60,
                       clock=lambda: now[0])
    first = source.reading(_req(DEAD))
    assert first.total_lag == 5
    release.clear()  # the cluster stops answering
    reader.lag = 9
    assert source.reading(_req(DEAD)) == first and source.stale_answers == 1
    with pytest.raises(Unavailable):  # another trigger on that cluster has no last answer
        source.reading(_req(DEAD, "other"))
    now[0] = 61.0
    with pytest.raises(Unavailable, match="no answer from Kafka at dead:9092 within 0.2s"):
        source.reading(_req(DEAD))
    release.set()


def test_one_read_in_flight_per_trigger_however_many_callers():
    release = threading.Event()
    reader = FakeReader(GOOD, release)
    source = LagSource(cache_s=0, reader_factory=lambda b: reader, call_timeout_s=0.1)
    for _ in range(20):
        with pytest.raises(Unavailable):
            source.reading(_req(GOOD))
    assert len(source._inflight) == 1  # the callers shared one hung read
    release.set()
    deadline = time.monotonic() + 5
    while source._inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert source.reading(_req(GOOD)).total_lag == 5


def test_idle_state_is_evicted_lru_and_readers_closed():
    factory = Factory()
    source = LagSource(cache_s=0, reader_factory=factory, max_groups=3, max_clusters=2)
    for i in range(10):
        source.reading(_req(GOOD, f"g{i}"))
    assert len(source._groups) == 3 and len(source._answers) == 3
    assert [k[1] for k in source._groups] == ["g7", "g8", "g9"]
    source.reading(_req("b:1"))
    source.reading(_req(GOOD))  # GOOD most recent: b:1 goes next
    source.reading(_req("c:1"))
    assert list(source._clusters) == [GOOD, "c:1"]
    deadline = time.monotonic() + 5
    while not factory.made["b:1"].closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert factory.made["b:1"].closed and not factory.made[GOOD].closed
    source.close()


@pytest.mark.parametrize("value", ["", " ", "kafka", "kafka:", ":9092", "kafka:port", "kafka:99999", "kafka:0",
                                   "a b:9092", "kafka:9092,", "x" * 500, "kafka:9092\nevil:1", "kafka:٩٠"])
def test_malformed_bootstrap_is_a_metadata_error(value):
    with pytest.raises(MetadataError, match="bootstrapServers") as info:
        bootstrap_servers(value)
    assert len(str(info.value)) < 600 and "\n" not in str(info.value)


def test_well_formed_bootstraps():
    assert bootstrap_servers("a:1, b.example.com:9092,PLAINTEXT://c:9093,[::1]:9094,10.0.0.1:9092") == \
        ["a:1", "b.example.com:9092", "PLAINTEXT://c:9093", "[::1]:9094", "10.0.0.1:9092"]


def test_echoed_values_are_truncated():
    with pytest.raises(MetadataError) as info:
        parse_metadata({"bootstrapServers": "k:1", "consumerGroup": "g", "lagThreshold": "9" * 5000 + "x"})
    assert len(str(info.value)) < 300 and "5001 chars" in str(info.value)


@pytest.fixture
def grpc_scaler():
    factory = Factory()
    factory.unblock.set()
    server = serve(port=0, metrics_port=None, host="127.0.0.1", allowed_bootstrap=[GOOD, "other:1,other:2"],
                   source=LagSource(reader_factory=factory, call_timeout_s=1.0))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.ExternalScalerStub(channel)
    channel.close()
    server.stop(grace_s=0)


def _ref(meta):
    return pb.ScaledObjectRef(name="w", namespace="n", scalerMetadata=meta)


@pytest.mark.parametrize("bootstrap,code", [
    ("nope", grpc.StatusCode.INVALID_ARGUMENT),
    ("good:notaport", grpc.StatusCode.INVALID_ARGUMENT),
    ("evil:9092", grpc.StatusCode.PERMISSION_DENIED),
    ("good:9092,evil:9092", grpc.StatusCode.PERMISSION_DENIED),
])
def test_bad_or_disallowed_bootstrap_over_grpc(grpc_scaler, bootstrap, code):
    with pytest.raises(grpc.RpcError) as info:
        grpc_scaler.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref(
            {"bootstrapServers": bootstrap, "consumerGroup": "g", "topic": "t"})))
    assert info.value.code() == code and "bootstrapServers" in info.value.details()


def test_allowed_bootstraps_are_served(grpc_scaler):
    for bootstrap in (GOOD, "OTHER:2", "other:1,other:2"):
        meta = {"bootstrapServers": bootstrap, "consumerGroup": "g", "topic": "t"}
        assert grpc_scaler.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref(meta))) \
            .metricValues[0].metricValueFloat == 5.0


def test_long_metric_name_is_truncated_in_not_found(grpc_scaler):
    meta = {"bootstrapServers": GOOD, "consumerGroup": "g", "topic": "t"}
    with pytest.raises(grpc.RpcError) as info:
        grpc_scaler.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=_ref(meta), metricName="m" * 10_000))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and len(info.value.details()) < 400
