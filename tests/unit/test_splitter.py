"""The live side of the pool policy: the splitter the scaler injects and what it observes
(in-memory Deployments and usage records here; tests/integration/test_pool_state.py
runs the real Kafka and HTTP paths)."""

from __future__ import annotations

import json

import pytest

from spotbatch.scheduler.pool_state import InterruptionRates, LivePoolState, interruption_rate_per_h
from spotbatch.scheduler.pools import PoolConfig, config_to_metadata
from spotbatch.scheduler.splitter import HybridSplitter


class Deployments:
    def __init__(self, requested: int, ready: int) -> None:
        self.requested, self.ready, self.calls = requested, ready, 0

    def replicas(self, name: str) -> tuple[int, int]:
        assert name == "spotbatch-worker-spot"
        self.calls += 1
        return self.requested, self.ready


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


META = {**config_to_metadata(PoolConfig(baseline=2, spot_max=20, fallback_cap=5, unready_grace_s=300, recover_s=600)),
        "consumerGroup": "g", "topic": "jobs", "lagThreshold": "10"}


def splitter_for(deps: Deployments, clock: Clock, rate: float = 0.0) -> HybridSplitter:
    state = LivePoolState(deps, lambda: rate, cache_s=0.0, clock=clock)
    return HybridSplitter(lambda meta: state, clock=clock)


def test_shares_follow_the_policy_through_a_spot_outage():
    deps, clock = Deployments(8, 8), Clock()
    s = splitter_for(deps, clock)
    assert (s.replicas("on-demand", 10, {**META, "pool": "on-demand"}), s.replicas("spot", 10, META)) == (2, 8)
    deps.ready = 1  # spot capacity gone
    clock.now = 100
    assert s.replicas("on-demand", 10, META) == 2  # within the grace
    clock.now = 400
    assert s.replicas("on-demand", 10, META) == 2 + 5  # gap 7, capped at 5
    assert s.replicas("spot", 10, META) == 8  # spot stays requested so it can recover
    deps.ready = 8
    clock.now = 500
    assert s.replicas("on-demand", 10, META) == 7  # recovering: held
    clock.now = 1100
    assert s.replicas("on-demand", 10, META) == 2  # handed back


def test_workloads_keep_separate_memories():
    deps, clock = Deployments(8, 0), Clock()
    s = splitter_for(deps, clock)
    s.replicas("on-demand", 10, META)
    clock.now = 400
    assert s.replicas("on-demand", 10, META) == 7
    assert s.replicas("on-demand", 10, {**META, "consumerGroup": "other"}) == 2  # its clock starts now


def test_storm_falls_back_at_once():
    s = splitter_for(Deployments(8, 8), Clock(), rate=1.0)
    assert s.replicas("on-demand", 10, META) == 7


def test_bad_metadata_names_the_key():
    s = splitter_for(Deployments(0, 0), Clock())
    with pytest.raises(ValueError, match="baseline"):
        s.replicas("spot", 3, {**META, "baseline": "two"})
    with pytest.raises(ValueError, match="pool"):
        s.replicas("gpu", 3, META)


def test_pool_state_is_cached():
    deps, clock = Deployments(3, 3), Clock()
    state = LivePoolState(deps, None, cache_s=2.0, clock=clock)
    state.observe(), state.observe()
    assert deps.calls == 1
    clock.now = 2.0
    assert state.observe().spot_ready == 3 and deps.calls == 2


def usage(rid: str, *, pool: str = "spot", end: float = 1000.0, alive_s: float = 3600.0, interruptions: int = 0) -> dict:
    return {"v": 1, "kind": "usage", "record_id": rid, "worker": rid.split("-")[0], "pool": pool, "end": end,
            "start": max(0.0, end - alive_s), "seconds_alive": alive_s, "interruptions": interruptions,
            "instance_type": "g5.xlarge", "gpus": 1, "seconds_busy": 0.0, "rows": 0, "jobs": 0, "rows_recomputed": 0}


def test_interruption_rate_per_replica_hour():
    recs = [usage("a-1", interruptions=1), usage("b-1"), usage("b-1"),  # redelivered: once
            usage("c-1", pool="on-demand", interruptions=5), usage("d-1", end=-5000, interruptions=9),
            {"kind": "interruption", "worker": "a", "rows_lost": 3}]
    assert interruption_rate_per_h(recs, now_s=1000, window_s=3600) == pytest.approx(0.5)
    assert interruption_rate_per_h([usage("a-1", alive_s=600, interruptions=1)], now_s=1000, window_s=3600) == 0.0


class Record:
    def __init__(self, value: bytes) -> None:
        self.value = value


class Reader:
    """kafka_admin.OffsetReader's two calls over an in-memory log."""

    def __init__(self) -> None:
        self.log: list[bytes] = []

    def log_ends(self, topics):
        return {("usage", 0): len(self.log)}

    def read_ranges(self, ranges):
        (start, end), = ranges.values()
        return [Record(v) for v in self.log[start:end]]


def test_interruption_rates_read_incrementally_and_forget_old_records():
    reader, clock = Reader(), Clock()
    clock.now = 1000.0
    rates = InterruptionRates(reader, "usage", window_s=3600, clock=clock)
    assert rates.rate() == 0.0
    reader.log += [json.dumps(usage("a-1", interruptions=2)).encode(), b"not json", json.dumps(usage("b-1")).encode()]
    assert rates.rate() == pytest.approx(1.0)
    clock.now = 1000.0 + 3600
    reader.log.append(json.dumps(usage("c-1", end=clock.now, interruptions=0)).encode())
    assert rates.rate() == 0.0  # a-1 and b-1 left the window
