"""Token-aware batching: the batcher sorts a window by tokens and cuts it by a token
budget; the stage thread collates and uploads a batch ahead; rows still land in their
own job, in order. The last test runs the real MiniLM through the worker loop."""

from __future__ import annotations

import json
import random
from collections import namedtuple

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from spotbatch.config import load_settings
from spotbatch.jobs import parse_job
from spotbatch.models import get_handler
from spotbatch.models.base import Prepared
from spotbatch.models.runner import BatchRunner, Staged
from spotbatch.testing.broker import MemoryBroker
from spotbatch.workers import build_worker
from spotbatch.workers.batcher import Batcher, PendingJob
from spotbatch.workers.inference import InferenceThread

Record = namedtuple("Record", "topic partition offset key value headers")
_offsets = iter(range(10**6))


def _prepare(values):
    """A fake prepare stage: a row of value v costs v tokens."""
    return Prepared(list(values), [[1] * v for v in values], np.asarray(values, dtype=np.int64))


def _by_job(prepare):
    """The batcher prepares a job: here from its values alone."""
    return lambda job: prepare(job.values)


def _job(job_id: str, lengths: list[int]) -> PendingJob:
    rows = [{"id": f"{job_id}-{i}", "text": "x"} for i in range(len(lengths))]
    raw = json.dumps({"job_id": job_id, "model": "tiny", "inputs": {"rows": rows}}).encode()
    record = Record("jobs", 0, next(_offsets), job_id.encode(), raw, [])
    return PendingJob(parse_job(raw), record, [r["id"] for r in rows], list(lengths), f"/o/{job_id}", {})


def _drain(batcher: Batcher) -> list:
    out = []
    while (batch := batcher.next_batch(force=True)) is not None:
        out.append(batch)
    return out


def _jobs(seed: int = 7, n: int = 12) -> list[PendingJob]:
    rng = random.Random(seed)
    return [_job(f"j{k}", [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]) for k in range(n)]


def test_batches_stay_within_the_token_budget_and_cover_every_row_once():
    jobs = _jobs()
    batcher = Batcher(max_batch_rows=32, max_wait_ms=0, max_batch_tokens=2000, prepare=_by_job(_prepare), window_rows=10**6)
    for job in jobs:
        batcher.add(job)
    batches = _drain(batcher)
    seen = []
    for batch in batches:
        assert batch.rows <= 32
        assert batch.tokens <= 2000 or batch.rows == 1  # a lone row over budget still runs
        seen += [(s.job.job.job_id, i) for s in batch.segments for i in range(s.start, s.stop)]
    assert sorted(seen) == sorted((j.job.job_id, i) for j in jobs for i in range(j.rows))
    assert batcher.pending_rows == 0


def test_sorting_cuts_padding_against_arrival_order():
    jobs = _jobs(seed=3, n=20)
    arrival = Batcher(max_batch_rows=32, max_wait_ms=0)
    tokens = Batcher(max_batch_rows=32, max_wait_ms=0, max_batch_tokens=None, prepare=_by_job(_prepare), window_rows=10**6)
    for job in jobs:
        arrival.add(job)
        tokens.add(job)
    padded = lambda batches: sum(max(b.values) * b.rows for b in batches)  # noqa: E731
    sorted_batches = _drain(tokens)
    assert [b.rows for b in sorted_batches][1:] and all(b.rows <= 32 for b in sorted_batches)
    assert padded(sorted_batches) < 0.75 * padded(_drain(arrival))
    # Longest first, so a batch that cannot fit on the device shows it at once.
    longest = [int(b.values.lengths.max()) for b in sorted_batches]
    assert longest == sorted(longest, reverse=True)


def test_each_job_gets_its_own_rows_back_in_order():
    jobs = _jobs(seed=11)
    batcher = Batcher(max_batch_rows=16, max_wait_ms=0, max_batch_tokens=1500, prepare=_by_job(_prepare), window_rows=10**6)
    for job in jobs:
        batcher.add(job)
    for batch in _drain(batcher):
        values = batch.values
        assert isinstance(values, Prepared)
        outputs = {"v": np.asarray(values.values, dtype=np.float32) * 10}
        for segment, part in batch.split(outputs):
            segment.job.add_part(segment.start, part)
    for job in jobs:
        assert job.complete
        np.testing.assert_array_equal(job.outputs()["v"], np.asarray(job.values, dtype=np.float32) * 10)


def test_a_window_waits_until_full_or_due():
    batcher = Batcher(max_batch_rows=4, max_wait_ms=1000, max_batch_tokens=100, prepare=_by_job(_prepare), window_rows=12)
    batcher.add(_job("a", [5] * 8))
    assert batcher.next_batch() is None and batcher.seconds_until_due() > 0
    batcher.add(_job("b", [5] * 8))  # 16 rows >= the 12-row window: it closes into 3 batches
    first = batcher.next_batch()
    assert first is not None and first.rows == 4
    assert batcher.seconds_until_due() == 0.0  # its other batches are ready at once
    assert len(_drain(batcher)) == 3  # 2 more of the window, then the 4 rows left over, forced


def test_drop_removes_revoked_jobs_from_ready_batches_too():
    keep, gone = _job("keep", [10] * 6), _job("gone", [10] * 6)
    batcher = Batcher(max_batch_rows=4, max_wait_ms=0, max_batch_tokens=None, prepare=_by_job(_prepare), window_rows=12)
    batcher.add(keep)
    batcher.add(gone)
    batcher.next_batch()  # the window is now cut into ready batches
    dropped = batcher.drop(lambda job: job is keep)
    assert dropped == [gone]
    rest = _drain(batcher)
    assert all(s.job is keep for b in rest for s in b.segments)
    assert batcher.pending_rows == 0


def test_a_failing_prepare_leaves_the_job_unsorted_not_lost():
    def flaky(values):
        if 13 in values:
            raise ValueError("tokenizer exploded")
        return _prepare(values)

    batcher = Batcher(max_batch_rows=8, max_wait_ms=0, max_batch_tokens=100, prepare=_by_job(flaky), window_rows=100)
    good, bad = _job("good", [3, 4]), _job("bad", [13, 2])
    batcher.add(good)
    batcher.add(bad)
    assert good.prepared is not None and bad.prepared is None
    batches = _drain(batcher)
    assert sum(b.rows for b in batches) == 4
    assert any(not isinstance(b.values, Prepared) for b in batches)  # raw values: predict() tokenises


# -- the stage thread and the runner --------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    handler = get_handler("minilm")
    handler.load(torch.device("cpu"))
    return handler


TEXTS = ["short", "a somewhat longer sentence about spot instances", "x " * 120, "medium length text here", "y"]


def test_staged_and_prepared_runs_match_plain_predict(minilm):
    runner = BatchRunner(minilm, device="cpu")
    plain = runner.run(TEXTS, {})["embedding"]
    prepared = minilm.prepare(TEXTS)
    assert list(prepared.lengths) == [len(ids) for ids in prepared.items]
    np.testing.assert_allclose(runner.run(prepared, {})["embedding"], plain, atol=1e-5)
    staged = runner.stage(prepared)
    assert isinstance(staged, Staged)
    np.testing.assert_allclose(runner.run(staged, {})["embedding"], plain, atol=1e-5)
    # An OOM half is trimmed to its own longest row and still gives the same rows.
    half = staged[:2]
    assert half.tensors["input_ids"].shape == (2, int(prepared.lengths[:2].max()))
    np.testing.assert_allclose(runner.run(half, {})["embedding"], plain[:2], atol=1e-5)


def test_inference_thread_stages_ahead_and_returns_every_batch(minilm):
    runner = BatchRunner(minilm, device="cpu")
    staged_calls = []

    def stage(values):
        staged_calls.append(len(values))
        return runner.stage(values)

    batcher = Batcher(max_batch_rows=2, max_wait_ms=0, max_batch_tokens=None, prepare=_by_job(minilm.prepare), window_rows=64)
    job = _job("t", [0] * len(TEXTS))
    job.values = list(TEXTS)
    batcher.add(job)
    thread = InferenceThread(runner.run, max_in_flight=8, stage=stage)
    try:
        batches = _drain(batcher)
        for batch in batches:
            thread.submit(batch)
        results = []
        while len(results) < len(batches):
            results += thread.results()
    finally:
        thread.stop()
    assert sorted(staged_calls) == sorted(b.rows for b in batches)
    for result in results:
        assert not result.failures
        for segment, part in result.parts:
            segment.job.add_part(segment.start, part)
    np.testing.assert_allclose(job.outputs()["embedding"], runner.run(TEXTS, {})["embedding"], atol=1e-5)


# -- the real worker loop, MiniLM, token budget ---------------------------------------


def test_worker_with_token_batching_writes_the_same_embeddings(tmp_path, minilm, clean_env):
    rng = random.Random(5)
    words = "spot gpu batch kafka parquet worker model token row job".split()
    broker = MemoryBroker()
    broker.create_topic("jobs", partitions=2)
    texts = {}
    for j in range(6):
        rows = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(rng.randint(3, 9))]
        texts[f"job-{j}"] = rows
        body = {"job_id": f"job-{j}", "model": "minilm",
                "inputs": {"rows": [{"id": f"{j}-{i}", "text": t} for i, t in enumerate(rows)]}}
        broker.publish("jobs", json.dumps(body).encode(), key=f"job-{j}".encode(), partition=j % 2)
    settings = load_settings(topic="jobs", group="g", model="minilm", device="cpu", output=str(tmp_path / "out"),
                             max_wait_ms=5, metrics_port=0, max_batch_rows=8, max_batch_tokens=200)
    worker = build_worker(settings, burst=True, broker=broker)
    assert worker._batcher.sorts
    stats = worker.run()
    assert stats.jobs_ok == 6
    reference = BatchRunner(minilm, device="cpu")
    for job_id, rows in texts.items():
        table = pq.read_table(next((tmp_path / "out").rglob(f"{job_id}.parquet")))
        assert table.column("id").to_pylist() == [f"{job_id[4:]}-{i}" for i in range(len(rows))]
        got = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(got, reference.run(rows, {})["embedding"], atol=1e-4)
