"""The worker's usage meter: records tile the worker's life and follow the interface."""

from __future__ import annotations

import pytest

from spotbatch.workers.usage import UsageMeter, is_interruption

KEYS = {"v", "kind", "record_id", "worker", "pool", "instance_type", "gpus", "start", "end", "seconds_alive",
        "seconds_busy", "rows", "jobs", "interruptions", "rows_recomputed", "final", "at"}


class Clock:
    def __init__(self, t: float = 1_764_500_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def meter(clock):
    sent: list[dict] = []
    m = UsageMeter(worker_id="w1", pool="on-demand", instance_type="g5.xlarge", gpus=1, interval_s=60,
                   emit=sent.append, clock=clock)
    m.sent = sent
    return m


def test_no_record_before_the_interval(meter, clock):
    clock.t += 59.9
    assert meter.tick() is None
    assert meter.sent == []


def test_records_tile_the_life_and_carry_the_interface(meter, clock):
    clock.t += 61
    meter.add_busy(10.0, rows=100)
    meter.add_job()
    first = meter.tick()
    clock.t += 30
    meter.add_busy(5.0, rows=50)
    meter.add_stop(reason="aws: spot instance-action terminate", rows_recomputed=7)
    last = meter.close()
    assert meter.sent == [first, last]
    assert set(first) == KEYS == set(last)
    assert first["record_id"] == "w1-0" and last["record_id"] == "w1-1"
    assert first["end"] == last["start"]  # disjoint and contiguous
    assert (first["seconds_alive"], last["seconds_alive"]) == (61, 30)
    assert (first["rows"], first["jobs"], first["seconds_busy"], first["final"]) == (100, 1, 10.0, False)
    assert (last["rows"], last["jobs"], last["interruptions"], last["rows_recomputed"], last["final"]) == (50, 0, 1, 7, True)
    assert (last["pool"], last["instance_type"], last["gpus"], last["kind"], last["v"]) == ("on-demand", "g5.xlarge", 1, "usage", 1)


def test_busy_never_exceeds_alive_and_the_excess_carries_over(meter, clock):
    clock.t += 60
    meter.add_busy(90.0)  # a batch that straddled the interval boundary
    assert meter.tick()["seconds_busy"] == 60
    clock.t += 60
    assert meter.tick()["seconds_busy"] == 30


def test_close_emits_once_and_stops_ticks(meter, clock):
    assert meter.close()["final"] is True
    clock.t += 600
    assert meter.close() is None and meter.tick() is None
    assert len(meter.sent) == 1


def test_a_clock_step_backwards_never_gives_negative_seconds(meter, clock):
    clock.t -= 100
    record = meter.close()
    assert record["seconds_alive"] == 0 and record["end"] == record["start"]


def test_default_clock_is_monotonic_epoch():
    sent: list[dict] = []
    UsageMeter(worker_id="w", pool="spot", instance_type="local", gpus=0, interval_s=1, emit=sent.append).close()
    assert sent[0]["end"] >= sent[0]["start"] > 1_700_000_000


def test_rejects_a_non_positive_interval():
    with pytest.raises(ValueError, match="interval_s"):
        UsageMeter(worker_id="w", pool="spot", instance_type="t", gpus=0, interval_s=0, emit=print)


@pytest.mark.parametrize("reason, counted", [
    ("aws: spot instance-action terminate at 2026-11-30T12:00:00Z", True), ("gcp: preempted", True),
    ("azure: Preempt", True), ("signal: SIGTERM", False), ("signal: SIGINT", False), ("stop requested", False),
])
def test_which_stops_are_interruptions(meter, reason, counted):
    assert is_interruption(reason) is counted
    meter.add_stop(reason=reason, rows_recomputed=3)
    record = meter.close()
    assert (record["interruptions"], record["rows_recomputed"]) == (int(counted), 3)
