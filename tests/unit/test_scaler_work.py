"""Work mode inputs: pending rows (inline, URI files, checkpoints) and learned rates."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spotbatch.checkpointing import LocalCheckpointStore, Progress
from spotbatch.scaler.work import (
    JobRows,
    PendingWork,
    RowCounter,
    UsageRates,
    UsageSample,
    count_input_rows,
    learned_rate,
    pending_rows,
)

PENDING_RULES = [
    ("inline rows count in full", [JobRows("a", 5), JobRows("b", 7)], {}, 12),
    ("URI job less its checkpointed rows", [JobRows("u", 100, uri=True)], {"u": 40}, 60),
    ("checkpoint never below zero", [JobRows("u", 100, uri=True)], {"u": 140}, 0),
    ("inline jobs ignore checkpoints", [JobRows("a", 5)], {"a": 5}, 5),
    ("bad job (no id) counts its 0 rows", [JobRows(None, 0)], {}, 0),
    ("republished job counts twice", [JobRows("a", 5), JobRows("a", 5)], {}, 10),
    ("nothing pending", [], {}, 0),
]


@pytest.mark.parametrize("jobs,done,expected", [r[1:] for r in PENDING_RULES], ids=[r[0] for r in PENDING_RULES])
def test_pending_rows_rules(jobs, done, expected):
    assert pending_rows(jobs, done) == expected


def _s(rid, end, rows, busy, worker="w"):
    return UsageSample(rid, worker, end, rows, busy)


RATE_RULES = [
    ("no reports: default", [], 7.0),
    ("rows / seconds_busy", [_s("w-1", 990, 500, 10.0)], 50.0),
    ("pooled over workers", [_s("a-1", 990, 500, 10.0), _s("b-1", 995, 100, 10.0, "b")], 30.0),
    ("outside the window: ignored", [_s("w-1", 100, 500, 10.0)], 7.0),
    ("idle records (no busy time): default", [_s("w-1", 990, 0, 0.0)], 7.0),
    ("window edge counts", [_s("w-1", 400, 60, 2.0)], 30.0),
]


@pytest.mark.parametrize("samples,expected", [r[1:] for r in RATE_RULES], ids=[r[0] for r in RATE_RULES])
def test_learned_rate_rules(samples, expected):
    assert learned_rate(samples, now=1000.0, window_s=600.0, default=7.0) == expected


def test_count_input_rows(tmp_path):
    pq.write_table(pa.table({"id": [str(i) for i in range(37)], "text": ["x"] * 37}), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text('{"id": "1"}\n\n{"id": "2"}\n{"id": "3"}\n')
    (tmp_path / "in.json").write_text('[{"id": "1"}, {"id": "2"}]')
    assert count_input_rows(str(tmp_path / "in.parquet")) == 37
    assert count_input_rows(f"file://{tmp_path}/in.jsonl") == 3
    assert count_input_rows(str(tmp_path / "in.json")) == 2


def _job(job_id, *, rows=None, uri=None) -> bytes:
    inputs = {"uri": uri} if uri else {"rows": [{"id": str(i), "text": "t"} for i in range(rows)]}
    return json.dumps({"version": 1, "job_id": job_id, "model": "tiny", "inputs": inputs}).encode()


def test_row_counter_caches_uri_counts_by_job_id():
    calls = []
    counter = RowCounter(count=lambda uri: calls.append(uri) or 10)
    for _ in range(3):
        assert counter.job_rows(_job("u1", uri="/data/a.parquet")) == JobRows("u1", 10, uri=True)
    assert calls == ["/data/a.parquet"]
    assert counter.job_rows(_job("i1", rows=4)) == JobRows("i1", 4)
    assert counter.job_rows(b"not json") == JobRows(None, 0)


def test_row_counter_missing_file_counts_zero_and_retries(tmp_path):
    counter = RowCounter(input_prefixes=[str(tmp_path)])
    job = _job("u1", uri=str(tmp_path / "later.jsonl"))
    assert counter.job_rows(job).rows == 0
    (tmp_path / "later.jsonl").write_text('{"id": "1"}\n')
    assert counter.job_rows(job).rows == 1


def test_row_counter_reads_only_where_workers_may(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "secret"
    inside.mkdir(), outside.mkdir()
    for folder in (inside, outside):
        (folder / "a.jsonl").write_text('{"id": "1"}\n{"id": "2"}\n')
    os.mkfifo(inside / "pipe.jsonl")  # would block an open() without O_NONBLOCK
    counter = RowCounter(input_prefixes=[str(inside)])
    assert counter.job_rows(_job("ok", uri=str(inside / "a.jsonl"))).rows == 2
    assert counter.job_rows(_job("out", uri=str(outside / "a.jsonl"))).rows == 0
    assert counter.job_rows(_job("fifo", uri=str(inside / "pipe.jsonl"))).rows == 0
    assert RowCounter().job_rows(_job("none", uri=str(inside / "a.jsonl"))).rows == 0  # no prefixes: none


class FakeReader:
    """In-memory stand-in for kafka_admin.OffsetReader (unit tests only)."""

    def __init__(self, logs):
        self.logs = logs  # {(topic, partition): [value, ...]}
        self.reads = []

    def log_ends(self, topics):
        return {tp: len(v) for tp, v in self.logs.items() if tp[0] in topics}

    def read_ranges(self, ranges):
        self.reads.append(dict(ranges))
        return [SimpleNamespace(topic=t, partition=p, offset=o, value=self.logs[(t, p)][o])
                for (t, p), (a, b) in ranges.items() for o in range(a, b)]


def test_pending_work_reads_each_message_once_and_counts_checkpoints(tmp_path):
    store = LocalCheckpointStore(str(tmp_path / "ck"))
    pq.write_table(pa.table({"id": [str(i) for i in range(100)]}), tmp_path / "big.parquet")
    progress = Progress.new("u1", parts_total=4, owner="w")
    progress.mark_part_done(0, 25)
    store.save(progress, expected_generation=None)
    logs = {("jobs", 0): [_job("a", rows=3), _job("u1", uri=str(tmp_path / "big.parquet"))],
            ("jobs", 1): [_job("b", rows=5)]}
    reader = FakeReader(logs)
    work = PendingWork(reader, checkpoints=store, counter=RowCounter(input_prefixes=[str(tmp_path)]))
    ends = reader.log_ends(["jobs"])
    assert work.pending({}, ends) == 3 + 75 + 5
    assert work.pending({("jobs", 0): 1}, ends) == 75 + 5  # "a" committed
    assert reader.reads[1] == {("jobs", 0): (2, 2), ("jobs", 1): (1, 1)}  # nothing re-read
    logs[("jobs", 1)].append(_job("c", rows=2))
    assert work.pending({("jobs", 0): 2, ("jobs", 1): 1}, reader.log_ends(["jobs"])) == 2
    assert reader.reads[2][("jobs", 1)] == (1, 2)


def test_pending_work_no_commit_latest_starts_at_the_end():
    reader = FakeReader({("jobs", 0): [_job("a", rows=3)]})
    assert PendingWork(reader, offset_reset_policy="latest").pending({}, reader.log_ends(["jobs"])) == 0
    assert PendingWork(reader, offset_reset_policy="earliest").pending({}, reader.log_ends(["jobs"])) == 3


def _usage(rid, end, rows, busy, kind="usage"):
    return json.dumps({"v": 1, "kind": kind, "record_id": rid, "worker": "w", "pool": "spot",
                       "instance_type": "local", "gpus": 0, "start": end - 60, "end": end,
                       "seconds_alive": 60.0, "seconds_busy": busy, "rows": rows, "jobs": 1,
                       "interruptions": 0, "rows_recomputed": 0, "final": False, "at": end}).encode()


def test_usage_rates_dedupe_and_skip_other_kinds():
    logs = {("spotbatch.usage", 0): [_usage("w-1", 1000, 400, 10.0), _usage("w-1", 1000, 400, 10.0),
                                     b'{"kind": "interruption", "drain_s": 3}', b"garbage"]}
    reader = FakeReader(logs)
    rates = UsageRates(reader, "spotbatch.usage", clock=lambda: 1010.0)
    assert rates.rate(default=1.0) == 40.0
    logs[("spotbatch.usage", 0)].append(_usage("w-2", 1005, 100, 10.0))
    assert rates.rate(default=1.0) == 25.0  # (400 + 100) / 20, the duplicate counted once


def test_usage_rates_default_without_topic():
    class NoTopic(FakeReader):
        def log_ends(self, topics):
            from kafka.errors import UnknownTopicOrPartitionError
            raise UnknownTopicOrPartitionError("spotbatch.usage")

    assert UsageRates(NoTopic({}), "spotbatch.usage").rate(default=3.5) == 3.5
