"""InferenceThread: results flow back; a poison job fails alone; in-flight accounting."""

from __future__ import annotations

import json
import threading
import time
from collections import namedtuple

import numpy as np
import pytest

from spotbatch.errors import JobError
from spotbatch.jobs import parse_job
from spotbatch.workers.batcher import Batch, PendingJob, Segment
from spotbatch.workers.inference import BatchResult, InferenceThread

Record = namedtuple("Record", "topic partition offset key value headers")


def make_job(job_id: str, values: list) -> PendingJob:
    rows = [{"id": f"r{i}", "text": "t"} for i in range(len(values))]
    raw = json.dumps({"job_id": job_id, "model": "tiny", "inputs": {"rows": rows}}).encode()
    return PendingJob(parse_job(raw), Record("jobs", 0, 0, job_id.encode(), raw, []),
                      [r["id"] for r in rows], values, f"/out/{job_id}.parquet", {})


class FakeModel:
    """Doubles each value; raises on the value "poison" (or raise_error for every call)."""

    def __init__(self, raise_error: Exception | None = None, gate: threading.Event | None = None) -> None:
        self.calls: list[list] = []
        self.raise_error = raise_error
        self.gate = gate

    def __call__(self, values, params):
        self.calls.append(list(values))
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.raise_error is not None:
            raise self.raise_error
        if "poison" in values:
            raise RuntimeError("poison row hit the model")
        return {"y": np.array([len(v) for v in values], dtype=np.int64)}


@pytest.fixture
def threads():
    started = []

    def make(run):
        t = InferenceThread(run)
        started.append(t)
        return t

    yield make
    for t in started:
        t.stop(timeout_s=2)


def collect(thread: InferenceThread, n: int, timeout_s: float = 10.0) -> list[BatchResult]:
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out.extend(thread.results())
        time.sleep(0.01)
    assert len(out) == n, f"expected {n} results, got {len(out)}"
    return out


def test_results_come_back_for_submitted_batches(threads):
    model = FakeModel()
    t = threads(model)
    a, b = make_job("a", ["x", "yy", "zzz"]), make_job("b", ["four", "fives"])
    first = Batch([Segment(a, 0, 2)], {})
    second = Batch([Segment(a, 2, 3), Segment(b, 0, 2)], {"p": 1})
    t.submit(first)
    t.submit(second)
    results = collect(t, 2)
    assert [r.batch for r in results] == [first, second]
    assert all(r.failures == [] and r.seconds >= 0 for r in results)
    assert [(s.job, s.start, s.stop) for s, _ in results[0].parts] == [(a, 0, 2)]
    np.testing.assert_array_equal(results[0].parts[0][1]["y"], [1, 2])
    assert [(s.job, s.start) for s, _ in results[1].parts] == [(a, 2), (b, 0)]
    np.testing.assert_array_equal(results[1].parts[0][1]["y"], [3])
    np.testing.assert_array_equal(results[1].parts[1][1]["y"], [4, 5])
    assert model.calls == [["x", "yy"], ["zzz", "four", "fives"]]
    assert t.in_flight == 0


def test_poison_job_fails_alone_and_batch_mates_still_get_outputs(threads):
    model = FakeModel()
    t = threads(model)
    good1, bad, good2 = make_job("g1", ["a", "bb"]), make_job("bad", ["ok", "poison"]), make_job("g2", ["ccc"])
    batch = Batch([Segment(good1, 0, 2), Segment(bad, 0, 2), Segment(good2, 0, 1)], {})
    t.submit(batch)
    (result,) = collect(t, 1)

    assert [(s.job, s.start, s.stop) for s, _ in result.parts] == [(good1, 0, 2), (good2, 0, 1)]
    np.testing.assert_array_equal(result.parts[0][1]["y"], [1, 2])
    np.testing.assert_array_equal(result.parts[1][1]["y"], [3])
    assert len(result.failures) == 1
    job, error = result.failures[0]
    assert job is bad
    assert isinstance(error, JobError)
    assert error.code == "inference_failed"
    assert "RuntimeError" in error.reason and "poison row" in error.reason
    # One call for the whole batch, then one per segment.
    assert model.calls == [["a", "bb", "ok", "poison", "ccc"], ["a", "bb"], ["ok", "poison"], ["ccc"]]


def test_single_segment_failure_is_not_retried(threads):
    model = FakeModel(raise_error=ValueError("bad shape"))
    t = threads(model)
    job = make_job("solo", ["a", "b"])
    t.submit(Batch([Segment(job, 0, 2)], {}))
    (result,) = collect(t, 1)
    assert result.parts == []
    assert [(j, e.code) for j, e in result.failures] == [(job, "inference_failed")]
    assert "ValueError" in result.failures[0][1].reason
    assert len(model.calls) == 1


def test_job_error_from_the_model_keeps_its_code(threads):
    t = threads(FakeModel(raise_error=JobError("row_rejected", "row 'r0': too long")))
    a, b = make_job("a", ["x"]), make_job("b", ["y"])
    t.submit(Batch([Segment(a, 0, 1), Segment(b, 0, 1)], {}))
    (result,) = collect(t, 1)
    assert result.parts == []
    assert [(j.job.job_id, e.code) for j, e in result.failures] == [("a", "row_rejected"), ("b", "row_rejected")]


def test_in_flight_and_can_take(threads):
    gate = threading.Event()
    t = threads(FakeModel(gate=gate))
    assert t.in_flight == 0 and t.can_take()
    assert t.results() == []
    job = make_job("j", ["a", "b", "c"])
    t.submit(Batch([Segment(job, 0, 1)], {}))
    assert t.in_flight == 1 and t.can_take()
    t.submit(Batch([Segment(job, 1, 2)], {}))
    assert t.in_flight == 2 and not t.can_take()
    time.sleep(0.05)
    assert t.results() == []  # still gated: nothing came back
    assert t.in_flight == 2 and not t.can_take()

    gate.set()
    results = collect(t, 2)
    assert [r.batch.segments[0].start for r in results] == [0, 1]
    assert t.in_flight == 0 and t.can_take()


def test_results_drains_without_blocking(threads):
    t = threads(FakeModel())
    job = make_job("j", ["a"])
    t.submit(Batch([Segment(job, 0, 1)], {}))
    deadline = time.monotonic() + 10
    got = []
    while not got and time.monotonic() < deadline:
        got = t.results()
        time.sleep(0.01)
    assert len(got) == 1
    assert t.in_flight == 0
    time.sleep(0.05)
    assert t.results() == []
    assert t.in_flight == 0


def test_stop_ends_the_thread():
    t = InferenceThread(FakeModel())
    t.stop(timeout_s=2)
    assert not t._thread.is_alive()
