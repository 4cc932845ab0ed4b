"""The attempt ledger and admission of inline jobs: the crash-loop breaker's bookkeeping."""

from __future__ import annotations

import json
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import pytest

from spotbatch.errors import JobError
from spotbatch.jobs import parse_job
from spotbatch.testing.store import MemoryStore
from spotbatch.workers.admission import Admission
from spotbatch.workers.attempts import AttemptLedger, Session
from spotbatch.workers.batcher import PendingJob

Record = namedtuple("Record", "topic partition offset key value headers")


@pytest.fixture
def store():
    return MemoryStore()


def _ledger(store, owner, max_attempts=2):
    return AttemptLedger(store, "/ckpt/_attempts", owner, max_attempts)


def _unit(offset, partition=0):
    raw = json.dumps({"job_id": f"j{offset}", "model": "tiny", "inputs": {"rows": [{"id": "r", "text": "t"}]}}).encode()
    return PendingJob(parse_job(raw), Record("jobs", partition, offset, None, raw, []), ["r"], ["t"], "out", {})


def test_session_ranges_merge_and_trim():
    s = Session("w", "now")
    s.add([5, 3, 4, 7])
    s.add([8, 9, 1])
    assert s.ranges == [[3, 5], [7, 9], [1, 1]]
    assert s.covers(8) and not s.covers(6)
    s.trim(4)
    assert s.ranges == [[4, 5], [7, 9]]


def test_an_unreleased_session_is_seen_by_the_next_owner(store):
    first = _ledger(store, "w1")
    first.load("jobs", 0, committed=None)
    first.take_up("jobs", 0, [10, 11, 12])
    first.save("jobs", 0)  # then w1 dies: no release
    second = _ledger(store, "w2")
    second.load("jobs", 0, committed=11)
    assert [s.owner for s in second.prior("jobs", 0, 12)] == ["w1"]
    assert second.prior("jobs", 0, 13) == []
    assert second.prior("jobs", 0, 10) == []  # committed: trimmed at load


def test_a_released_session_counts_nothing(store):
    first = _ledger(store, "w1")
    first.load("jobs", 0, committed=None)
    first.take_up("jobs", 0, [1])
    first.save("jobs", 0)
    first.release("jobs", 0)  # a drain or a revoke
    second = _ledger(store, "w2")
    second.load("jobs", 0, committed=None)
    assert second.prior("jobs", 0, 1) == []


def test_a_corrupt_ledger_starts_afresh(store):
    store.write_atomic("/ckpt/_attempts/jobs/0.json", b"{not json")
    ledger = _ledger(store, "w")
    ledger.load("jobs", 0, committed=None)
    assert ledger.prior("jobs", 0, 0) == []


def _crash_after_taking_up(store, owner, offsets):
    ledger = _ledger(store, owner)
    ledger.load("jobs", 0, committed=None)
    ledger.take_up("jobs", 0, offsets)
    ledger.save("jobs", 0)


def test_admission_records_fresh_units_once_per_partition_before_they_run(store):
    ledger = _ledger(store, "w")
    ledger.load("jobs", 0, committed=None)
    ledger.load("jobs", 1, committed=None)
    writes = []
    real = store.write_atomic
    store.write_atomic = lambda uri, data, **kw: writes.append(uri) or real(uri, data, **kw)
    with ThreadPoolExecutor(1) as io:
        admission = Admission(ledger, io, max_batch_rows=8)
        for unit in (_unit(0), _unit(1), _unit(2, partition=1)):
            admission.admit(unit)
        assert admission.recorded() == []  # nothing goes to the model unrecorded
        admission.record(committed=lambda tp: None)
        io.submit(lambda: None).result()
        ready = admission.recorded()
    assert [u.record.offset for u in ready] == [0, 1, 2]
    assert sorted(writes) == ["/ckpt/_attempts/jobs/0.json", "/ckpt/_attempts/jobs/1.json"]


def test_suspects_run_alone_one_at_a_time_and_poison_is_refused(store):
    _crash_after_taking_up(store, "w1", [0, 1, 2])
    _crash_after_taking_up(store, "w2", [1])  # w2 died running suspect 1 alone
    ledger = _ledger(store, "w3", max_attempts=2)
    ledger.load("jobs", 0, committed=None)
    live = set()
    with ThreadPoolExecutor(1) as io:
        admission = Admission(ledger, io, max_batch_rows=8)
        with pytest.raises(JobError) as info:
            admission.admit(_unit(1))
        assert info.value.code == "too_many_attempts" and "w1" in info.value.reason and "w2" in info.value.reason
        a, c = _unit(0), _unit(2)
        admission.admit(a), admission.admit(c)
        live |= {a, c}
        assert admission.isolating
        done = lambda unit: unit not in live  # noqa: E731
        assert admission.next_suspect_batch(model_idle=False, done=done) is None  # others still on the model
        batch = _wait_batch(admission, done)
        assert [s.job for s in batch.segments] == [a]
        assert admission.next_suspect_batch(model_idle=True, done=done) is None  # a not durable yet
        live.discard(a)
        batch = _wait_batch(admission, done)
        assert [s.job for s in batch.segments] == [c]
        live.discard(c)
        assert admission.next_suspect_batch(model_idle=True, done=done) is None
        assert not admission.isolating
    # each suspect was recorded alone, right before it ran
    doc = json.loads(store.read_bytes("/ckpt/_attempts/jobs/0.json"))
    assert doc["sessions"][-1]["owner"] == "w3" and doc["sessions"][-1]["ranges"] == [[0, 0], [2, 2]]


def _wait_batch(admission, done):
    """The next suspect batch, once its ledger write (on the I/O thread) has landed."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch = admission.next_suspect_batch(model_idle=True, done=done)
        if batch is not None:
            return batch
        time.sleep(0.01)
    raise AssertionError("no suspect batch")


def test_ever_taken_covers_released_sessions_and_our_own(store):
    first = _ledger(store, "w1")
    first.load("jobs", 0, committed=None)
    first.take_up("jobs", 0, [5, 6])
    first.save("jobs", 0)
    first.release("jobs", 0)  # drained: its outputs may exist though it committed nothing
    second = _ledger(store, "w2")
    second.load("jobs", 0, committed=None)
    assert second.ever_taken("jobs", 0, 6) and not second.ever_taken("jobs", 0, 7)
    second.take_up("jobs", 0, [7])
    assert second.ever_taken("jobs", 0, 7)
    assert not second.ever_taken("jobs", 1, 5)  # a partition not ours
