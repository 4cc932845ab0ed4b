"""Publishing: rows -> deterministic jobs, and sends through an in-memory producer."""

from __future__ import annotations

import json

import pytest

from spotbatch.jobs import parse_job
from spotbatch.publish import PublishError, job_prefix_for, publish_jobs, publish_raw, rows_to_jobs


class FakeFuture:
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.timeouts: list = []

    def get(self, timeout=None):
        self.timeouts.append(timeout)
        if self.error is not None:
            raise self.error
        return "metadata"


class FakeProducer:
    """Records sends; ``fail`` maps a key to the exception its future raises."""

    def __init__(self, fail: dict[bytes, Exception] | None = None) -> None:
        self.fail = fail or {}
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.futures: list[FakeFuture] = []
        self.flushes = 0

    def send(self, topic, key=None, value=None):
        self.sent.append((topic, key, value))
        fut = FakeFuture(self.fail.get(key))
        self.futures.append(fut)
        return fut

    def flush(self, timeout=None):
        self.flushes += 1


def _rows(n: int, column: str = "text"):
    return [{"id": i, column: f"row {i}", "ignored": True} for i in range(n)]


# -- rows_to_jobs ---------------------------------------------------------------------


def test_rows_to_jobs_groups_rows():
    jobs = list(rows_to_jobs(_rows(7), model="tiny", input_column="text", rows_per_job=3, prefix="docs"))
    assert [j.job_id for j in jobs] == ["docs-000000", "docs-000001", "docs-000002"]
    assert [len(j.inputs.rows) for j in jobs] == [3, 3, 1]
    assert all(j.model == "tiny" for j in jobs)
    assert [r["id"] for j in jobs for r in j.inputs.rows] == [str(i) for i in range(7)]
    row = jobs[2].inputs.rows[0]
    assert row == {"id": "6", "text": "row 6"}  # only id + the input column travel
    assert jobs[0].output is None and jobs[0].params == {}


def test_rows_to_jobs_exact_multiple_has_no_empty_tail():
    jobs = list(rows_to_jobs(_rows(4), model="tiny", input_column="text", rows_per_job=2, prefix="p"))
    assert [len(j.inputs.rows) for j in jobs] == [2, 2]


def test_rows_to_jobs_is_deterministic():
    def build():
        return [j.to_bytes() for j in rows_to_jobs(_rows(5), model="tiny", input_column="text", rows_per_job=2,
                                                   prefix="x", output="s3://b/o/", params={"k": 1})]
    first = build()
    assert first == build()
    job = parse_job(first[0])
    assert job.output == "s3://b/o/" and job.params == {"k": 1}


def test_rows_to_jobs_custom_input_column():
    jobs = list(rows_to_jobs(_rows(1, "x"), model="m", input_column="x", rows_per_job=10, prefix="p"))
    assert jobs[0].inputs.rows[0] == {"id": "0", "x": "row 0"}


@pytest.mark.parametrize("bad_row,missing", [({"text": "no id"}, "id"), ({"id": "z"}, "text")])
def test_row_without_id_or_input_names_the_row_index(bad_row, missing):
    rows = _rows(3) + [bad_row] + _rows(2)
    gen = rows_to_jobs(rows, model="tiny", input_column="text", rows_per_job=2, prefix="p")
    assert next(gen).job_id == "p-000000"  # rows before the bad one still make jobs
    with pytest.raises(PublishError) as info:
        list(gen)
    assert str(info.value).startswith("row 3:")
    assert "'text'" in str(info.value)


def test_rows_per_job_must_be_positive():
    with pytest.raises(PublishError, match="rows-per-job"):
        list(rows_to_jobs(_rows(1), model="tiny", input_column="text", rows_per_job=0, prefix="p"))


def test_bad_prefix_is_a_publish_error_naming_the_job():
    with pytest.raises(PublishError, match="job bad/prefix-000000"):
        list(rows_to_jobs(_rows(1), model="tiny", input_column="text", rows_per_job=1, prefix="bad/prefix"))


@pytest.mark.parametrize("name,prefix", [
    ("data.jsonl", "data"),
    ("/tmp/in/my data.jsonl", "my_data"),
    ("s3://bucket/runs/rows.parquet", "rows"),
    ("a.b.ndjson", "a.b"),
    ("plain", "plain"),
    ("..jsonl", "job"),
    ("ünïcode.json", "n_code"),
    ("x" * 300 + ".pq", "x" * 100),
])
def test_job_prefix_for(name, prefix):
    assert job_prefix_for(name) == prefix
    assert parse_job(json.dumps({"job_id": f"{prefix}-000000", "model": "m",
                                 "inputs": {"rows": [{"id": "a"}]}}).encode())


# -- publish_jobs ---------------------------------------------------------------------


def test_publish_jobs_sends_keyed_jobs_and_counts():
    jobs = list(rows_to_jobs(_rows(5), model="tiny", input_column="text", rows_per_job=2, prefix="d"))
    producer = FakeProducer()
    ticks = []
    report = publish_jobs(producer, "jobs-topic", jobs, progress=lambda j, r: ticks.append((j, r)))
    assert (report.jobs, report.rows, report.failed, report.errors) == (3, 5, 0, [])
    assert report.ok
    assert [t for t, _, _ in producer.sent] == ["jobs-topic"] * 3
    assert [k for _, k, _ in producer.sent] == [b"d-000000", b"d-000001", b"d-000002"]
    assert [parse_job(v) for _, _, v in producer.sent] == jobs
    assert ticks == [(1, 2), (2, 4), (3, 5)]
    assert producer.flushes >= 1
    assert all(f.timeouts for f in producer.futures)  # every send was acknowledged


def test_publish_jobs_counts_failed_sends():
    jobs = list(rows_to_jobs(_rows(6), model="tiny", input_column="text", rows_per_job=2, prefix="d"))
    producer = FakeProducer(fail={b"d-000001": TimeoutError("no ack in time")})
    report = publish_jobs(producer, "t", jobs)
    assert (report.jobs, report.rows, report.failed) == (3, 6, 1)
    assert not report.ok
    assert report.errors == ["d-000001: no ack in time"]


def test_publish_jobs_empty():
    report = publish_jobs(FakeProducer(), "t", [])
    assert (report.jobs, report.rows, report.failed, report.ok) == (0, 0, 0, True)


# -- publish_raw ----------------------------------------------------------------------


def _line(job_id: str, n_rows: int | None = None) -> bytes:
    inputs = {"rows": [{"id": str(i), "text": "t"} for i in range(n_rows)]} if n_rows else {"uri": "s3://b/x.parquet"}
    return json.dumps({"job_id": job_id, "model": "tiny", "inputs": inputs}).encode()


def test_publish_raw_sends_lines_as_they_are():
    lines = [_line("a", 2) + b"  ", b"", b"   ", _line("b"), _line("c", 3)]
    producer = FakeProducer()
    report = publish_raw(producer, "raw-topic", lines)
    assert (report.jobs, report.rows, report.failed) == (3, 5, 0)  # a uri job counts 0 rows
    assert [(t, k) for t, k, _ in producer.sent] == [("raw-topic", b"a"), ("raw-topic", b"b"), ("raw-topic", b"c")]
    assert [v for _, _, v in producer.sent] == [_line("a", 2), _line("b"), _line("c", 3)]


def test_publish_raw_counts_failed_sends():
    producer = FakeProducer(fail={b"b": RuntimeError("broker said no")})
    report = publish_raw(producer, "t", [_line("a", 1), _line("b", 1)])
    assert (report.jobs, report.failed, report.ok) == (2, 1, False)
    assert report.errors == ["b: broker said no"]


@pytest.mark.parametrize("bad,code", [
    (b"{not json", "malformed_json"),
    (json.dumps({"version": 9, "job_id": "x", "model": "m", "inputs": {"uri": "u"}}).encode(), "unknown_version"),
    (json.dumps({"job_id": "x/y", "model": "m", "inputs": {"uri": "u"}}).encode(), "invalid_job"),
])
def test_publish_raw_rejects_an_invalid_line_with_its_number(bad, code):
    lines = [_line("a", 1), b"", bad, _line("c", 1)]
    producer = FakeProducer()
    with pytest.raises(PublishError) as info:
        publish_raw(producer, "t", lines)
    msg = str(info.value)
    assert msg.startswith("line 3:")
    assert code in msg
    assert b"c" not in [k for _, k, _ in producer.sent]  # nothing after the bad line is sent
