"""Batcher: size/time closing, segments across batches, params isolation, drop()."""

from __future__ import annotations

import json
import random
from collections import namedtuple

import numpy as np
import pytest

from spotbatch.jobs import parse_job
from spotbatch.workers.batcher import Batch, Batcher, PendingJob, Segment

Record = namedtuple("Record", "topic partition offset key value headers")


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


_offsets = iter(range(10**6))


def make_job(job_id: str, n: int, *, params: dict | None = None, partition: int = 0, base: int = 0) -> PendingJob:
    """A PendingJob with n integer values base, base+1, ... (so outputs show row order)."""
    params = params or {}
    rows = [{"id": f"{job_id}-r{i}", "text": f"t{i}"} for i in range(n)]
    raw = json.dumps({"job_id": job_id, "model": "tiny", "inputs": {"rows": rows}, "params": params}).encode()
    record = Record("jobs", partition, next(_offsets), job_id.encode(), raw, [])
    return PendingJob(parse_job(raw), record, [r["id"] for r in rows], list(range(base, base + n)),
                      f"/out/{job_id}.parquet", params)


def fake_model(values) -> dict[str, np.ndarray]:
    """One call's outputs: a 1-D and a 2-D column, each row a function of its value."""
    v = np.asarray(values, dtype=np.float32)
    return {"score": v * 2, "embedding": np.stack([v, -v], axis=1)}


def remaining_rows(batcher: Batcher) -> int:
    return sum(job.rows - start for job, start, _ in batcher._queue)


def spans(batch: Batch) -> list[tuple[str, int, int]]:
    return [(s.job.job.job_id, s.start, s.stop) for s in batch.segments]


# -- closing on size ------------------------------------------------------------------


def test_rejects_non_positive_batch_size():
    with pytest.raises(ValueError, match="max_batch_rows"):
        Batcher(max_batch_rows=0, max_wait_ms=10)


def test_empty_batcher():
    b = Batcher(max_batch_rows=4, max_wait_ms=10, clock=FakeClock())
    assert b.seconds_until_due() is None
    assert b.next_batch() is None
    assert b.next_batch(force=True) is None
    assert len(b) == 0 and b.pending_rows == 0


def test_batch_closes_at_max_batch_rows():
    clock = FakeClock()
    b = Batcher(max_batch_rows=4, max_wait_ms=1000, clock=clock)
    a = make_job("a", 3)
    b.add(a)
    assert b.pending_rows == 3
    assert b.next_batch() is None  # 3 < 4 and nothing has waited
    b.add(make_job("b", 2))
    assert b.pending_rows == 5
    assert b.seconds_until_due() == 0.0  # full: due now, without waiting
    batch = b.next_batch()
    assert batch is not None
    assert batch.rows == 4
    assert spans(batch) == [("a", 0, 3), ("b", 0, 1)]
    assert batch.values == [0, 1, 2, 0]
    assert b.pending_rows == 1 == remaining_rows(b)
    assert b.next_batch() is None  # the one row left must wait for max_wait


def test_exactly_full_batch_is_due_immediately():
    b = Batcher(max_batch_rows=3, max_wait_ms=60_000, clock=FakeClock())
    b.add(make_job("a", 3))
    batch = b.next_batch()
    assert spans(batch) == [("a", 0, 3)]
    assert len(b) == 0 and b.pending_rows == 0


# -- closing on time ------------------------------------------------------------------


def test_partial_batch_closes_after_max_wait():
    clock = FakeClock()
    b = Batcher(max_batch_rows=10, max_wait_ms=50, clock=clock)
    b.add(make_job("a", 2))
    assert b.seconds_until_due() == pytest.approx(0.050)
    clock.advance(0.020)
    assert b.seconds_until_due() == pytest.approx(0.030)
    assert b.next_batch() is None
    b.add(make_job("b", 1))  # a later job does not reset the head's wait
    clock.advance(0.020)
    assert b.seconds_until_due() == pytest.approx(0.010)
    assert b.next_batch() is None
    clock.advance(0.010)
    assert b.seconds_until_due() == 0.0
    batch = b.next_batch()
    assert spans(batch) == [("a", 0, 2), ("b", 0, 1)]
    assert b.pending_rows == 0 and len(b) == 0
    assert b.seconds_until_due() is None


def test_seconds_until_due_never_negative():
    clock = FakeClock()
    b = Batcher(max_batch_rows=10, max_wait_ms=50, clock=clock)
    b.add(make_job("a", 1))
    clock.advance(5.0)
    assert b.seconds_until_due() == 0.0
    assert b.next_batch() is not None


def test_wait_restarts_for_the_next_head():
    clock = FakeClock()
    b = Batcher(max_batch_rows=10, max_wait_ms=100, clock=clock)
    b.add(make_job("a", 1))
    clock.advance(0.080)
    b.add(make_job("b", 1, params={"x": 1}))  # cannot share a's batch
    clock.advance(0.020)
    assert spans(b.next_batch()) == [("a", 0, 1)]
    # b has waited 20 ms of its 100.
    assert b.seconds_until_due() == pytest.approx(0.080)
    assert b.next_batch() is None


def test_force_closes_a_partial_batch_early():
    clock = FakeClock()
    b = Batcher(max_batch_rows=10, max_wait_ms=10_000, clock=clock)
    b.add(make_job("a", 2))
    b.add(make_job("b", 3))
    assert b.next_batch() is None
    batch = b.next_batch(force=True)
    assert spans(batch) == [("a", 0, 2), ("b", 0, 3)]
    assert b.pending_rows == 0
    assert b.next_batch(force=True) is None


def test_force_still_respects_max_batch_rows():
    b = Batcher(max_batch_rows=2, max_wait_ms=10_000, clock=FakeClock())
    b.add(make_job("a", 5))
    assert spans(b.next_batch(force=True)) == [("a", 0, 2)]
    assert b.pending_rows == 3


# -- segments -------------------------------------------------------------------------


def test_big_job_is_split_and_reassembled_in_row_order():
    clock = FakeClock()
    b = Batcher(max_batch_rows=4, max_wait_ms=10, clock=clock)
    big = make_job("big", 10, base=100)
    small = make_job("small", 3, base=500)
    b.add(big)
    b.add(small)

    batches = []
    while (batch := b.next_batch(force=True)) is not None:
        assert batch.rows <= 4
        batches.append(batch)
        assert b.pending_rows == remaining_rows(b)
    assert [spans(x) for x in batches] == [
        [("big", 0, 4)],
        [("big", 4, 8)],
        [("big", 8, 10), ("small", 0, 2)],
        [("small", 2, 3)],
    ]

    pieces = [piece for batch in batches for piece in batch.split(fake_model(batch.values))]
    random.Random(7).shuffle(pieces)  # segments may finish in any order
    for seg, outputs in pieces:
        assert isinstance(seg, Segment)
        assert len(outputs["score"]) == seg.stop - seg.start
        seg.job.add_part(seg.start, outputs)

    for job in (big, small):
        assert job.complete
        got = job.outputs()
        want = fake_model(job.values)
        assert set(got) == {"score", "embedding"}
        np.testing.assert_array_equal(got["score"], want["score"])
        np.testing.assert_array_equal(got["embedding"], want["embedding"])
        assert got["embedding"].shape == (job.rows, 2)


def test_job_is_incomplete_until_every_segment_is_back():
    b = Batcher(max_batch_rows=2, max_wait_ms=10, clock=FakeClock())
    job = make_job("j", 5)
    b.add(job)
    batches = [b.next_batch(force=True) for _ in range(3)]
    assert [x.rows for x in batches] == [2, 2, 1]
    for batch in batches[:2]:
        for seg, out in batch.split(fake_model(batch.values)):
            seg.job.add_part(seg.start, out)
        assert not job.complete
    for seg, out in batches[2].split(fake_model(batches[2].values)):
        seg.job.add_part(seg.start, out)
    assert job.complete
    np.testing.assert_array_equal(job.outputs()["score"], [0, 2, 4, 6, 8])


def test_split_cuts_outputs_per_segment():
    a, c = make_job("a", 2, base=0), make_job("c", 3, base=10)
    batch = Batch([Segment(a, 0, 2), Segment(c, 1, 3)], {})
    assert batch.values == [0, 1, 11, 12]
    assert batch.rows == 4
    pieces = batch.split(fake_model(batch.values))
    assert [(s.job, s.start) for s, _ in pieces] == [(a, 0), (c, 1)]
    np.testing.assert_array_equal(pieces[0][1]["score"], [0, 2])
    np.testing.assert_array_equal(pieces[1][1]["score"], [22, 24])


# -- params ---------------------------------------------------------------------------


def test_jobs_with_different_params_never_share_a_batch():
    b = Batcher(max_batch_rows=100, max_wait_ms=10, clock=FakeClock())
    jobs = [make_job("p1", 2, params={"x": 1}), make_job("q", 2), make_job("p2", 2, params={"x": 1}),
            make_job("p3", 2, params={"x": 2})]
    for job in jobs:
        b.add(job)
    batches = []
    while (batch := b.next_batch(force=True)) is not None:
        batches.append(batch)
    for batch in batches:
        keys = {s.job.params_key for s in batch.segments}
        assert len(keys) == 1
        assert batch.params == batch.segments[0].job.params
    assert sorted(x for batch in batches for x in spans(batch)) == sorted(
        (j.job.job_id, 0, j.rows) for j in jobs)
    assert b.pending_rows == 0


def test_same_params_in_any_key_order_share_a_batch():
    b = Batcher(max_batch_rows=100, max_wait_ms=10, clock=FakeClock())
    b.add(make_job("a", 1, params={"x": 1, "y": True}))
    b.add(make_job("b", 1, params={"y": True, "x": 1}))
    assert spans(b.next_batch(force=True)) == [("a", 0, 1), ("b", 0, 1)]


def test_rows_with_other_params_do_not_make_a_batch_full():
    clock = FakeClock()
    b = Batcher(max_batch_rows=3, max_wait_ms=100, clock=clock)
    b.add(make_job("a", 2, params={"x": 1}))
    b.add(make_job("b", 2))
    # 4 rows are pending but only 2 could share a batch: still waiting for max_wait.
    assert b.seconds_until_due() == pytest.approx(0.1)
    assert b.next_batch() is None
    clock.advance(0.1)
    batch = b.next_batch()
    assert spans(batch) == [("a", 0, 2)]
    assert batch.params == {"x": 1}


# -- drop -----------------------------------------------------------------------------


def test_drop_removes_jobs_of_revoked_partitions():
    b = Batcher(max_batch_rows=3, max_wait_ms=10, clock=FakeClock())
    a = make_job("a", 5, partition=0)
    k = make_job("k", 2, partition=1)
    c = make_job("c", 4, partition=0)
    d = make_job("d", 1, partition=2)
    for job in (a, k, c, d):
        b.add(job)
    assert spans(b.next_batch(force=True)) == [("a", 0, 3)]  # a is half handed out
    assert b.pending_rows == 2 + 2 + 4 + 1

    dropped = b.drop(lambda job: job.tp.partition != 0)
    assert dropped == [a, c]
    assert len(b) == 2
    assert b.pending_rows == 3 == remaining_rows(b)

    batch = b.next_batch(force=True)
    assert spans(batch) == [("k", 0, 2), ("d", 0, 1)]
    assert b.pending_rows == 0


def test_drop_keeping_everything_changes_nothing():
    b = Batcher(max_batch_rows=2, max_wait_ms=10, clock=FakeClock())
    a, c = make_job("a", 3), make_job("c", 1)
    b.add(a)
    b.add(c)
    b.next_batch(force=True)
    assert b.drop(lambda job: True) == []
    assert b.pending_rows == 2 and len(b) == 2
    assert spans(b.next_batch(force=True)) == [("a", 2, 3), ("c", 0, 1)]


def test_pending_job_tp_and_rows():
    job = make_job("z", 3, partition=5)
    assert job.rows == 3
    assert (job.tp.topic, job.tp.partition) == ("jobs", 5)
    assert not job.complete
