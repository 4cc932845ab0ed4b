"""inputs: Parquet and JSONL rows from local paths, file:// and S3 (moto over HTTP)."""

from __future__ import annotations

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spotbatch.errors import JobError
from spotbatch.inputs import input_format, iter_rows, read_rows
from tests.fixtures_s3 import s3_bucket, s3_client, s3_endpoint  # noqa: F401

ROWS = [{"id": 1, "text": "alpha", "extra": 1.5}, {"id": 2, "text": "beta", "extra": 2.5},
        {"id": 30, "text": "gamma", "extra": 3.5}]


def _parquet_bytes(rows, row_group_size=None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    return buf.getvalue()


def _jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _job_error(fn, *args, **kwargs) -> JobError:
    with pytest.raises(JobError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("name", ["in.parquet", "in.PQ"])
def test_parquet_local(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(_parquet_bytes(ROWS))
    assert read_rows(str(path)) == (["1", "2", "30"], ["alpha", "beta", "gamma"])
    assert read_rows(f"file://{path}", id_column="text", input_column="extra") == (
        ["alpha", "beta", "gamma"], [1.5, 2.5, 3.5])


@pytest.mark.parametrize("name", ["in.jsonl", "in.ndjson", "in.json"])
def test_jsonl_local_skips_blank_lines(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(_jsonl_bytes(ROWS[:2]) + b"\n  \n" + _jsonl_bytes(ROWS[2:]))
    assert read_rows(str(path)) == (["1", "2", "30"], ["alpha", "beta", "gamma"])


def test_json_array_document(tmp_path):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert read_rows(str(path)) == (["1", "2", "30"], ["alpha", "beta", "gamma"])
    assert [r["extra"] for r in iter_rows(str(path))] == [1.5, 2.5, 3.5]


def test_parquet_and_jsonl_on_s3(s3_bucket, s3_client):
    s3_client.put_object(Bucket=s3_bucket, Key="in/a.parquet", Body=_parquet_bytes(ROWS))
    s3_client.put_object(Bucket=s3_bucket, Key="in/a.jsonl", Body=_jsonl_bytes(ROWS))
    expected = (["1", "2", "30"], ["alpha", "beta", "gamma"])
    assert read_rows(f"s3://{s3_bucket}/in/a.parquet") == expected
    assert read_rows(f"s3://{s3_bucket}/in/a.jsonl") == expected


def test_missing_local_and_s3_file_is_input_missing(tmp_path, s3_bucket):
    assert _job_error(read_rows, str(tmp_path / "nope.parquet")).code == "input_missing"
    assert _job_error(read_rows, f"s3://{s3_bucket}/nope.jsonl").code == "input_missing"
    assert _job_error(read_rows, str(tmp_path) + "/").code == "input_invalid"  # no extension


def test_missing_column_names_it_and_the_columns_present(tmp_path):
    pq_path, jl_path = tmp_path / "a.parquet", tmp_path / "a.jsonl"
    pq_path.write_bytes(_parquet_bytes(ROWS))
    jl_path.write_bytes(_jsonl_bytes([ROWS[0], {"id": 2, "body": "x"}]))
    err = _job_error(read_rows, str(pq_path), input_column="prompt")
    assert err.code == "input_invalid"
    assert "'prompt'" in err.reason and "'id', 'text', 'extra'" in err.reason
    err = _job_error(read_rows, str(jl_path))
    assert err.code == "input_invalid"
    assert "'text'" in err.reason and "record 2" in err.reason and "'body'" in err.reason


@pytest.mark.parametrize(("name", "data", "needle"), [
    ("bad.parquet", b"PAR1 this is not parquet", "Parquet"),
    ("bad.jsonl", b'{"id": 1, "text": "ok"}\n{"id": 2, "text": \n', "line 2"),
    ("bad.jsonl", b'{"id": 1, "text": "ok"}\n[1, 2]\n', "not a JSON object"),
    ("bad.jsonl", b'\xff\xfe\x00garbage\n', "line 1"),
    ("bad.csv", b"id,text\n1,a\n", "unknown input format"),
    ("nullid.jsonl", b'{"id": null, "text": "a"}\n', "null id"),
])
def test_unreadable_inputs_are_input_invalid(tmp_path, name, data, needle):
    path = tmp_path / name
    path.write_bytes(data)
    err = _job_error(read_rows, str(path))
    assert err.code == "input_invalid" and needle in err.reason


def test_unsupported_scheme_is_input_invalid():
    assert _job_error(read_rows, "gs://bkt/a.jsonl").code == "input_invalid"


def test_iter_rows_parquet_by_row_group(tmp_path):
    rows = [{"id": i, "text": f"t{i}"} for i in range(25)]
    path = tmp_path / "many.parquet"
    path.write_bytes(_parquet_bytes(rows, row_group_size=10))
    assert pq.ParquetFile(path).num_row_groups == 3
    assert list(iter_rows(str(path))) == rows


def test_iter_rows_jsonl_streams_line_by_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(_jsonl_bytes(ROWS[:1]) + b"not json\n")
    rows = iter_rows(str(path))
    assert next(rows) == ROWS[0]  # yielded before the bad line was even parsed
    with pytest.raises(JobError) as info:
        next(rows)
    assert info.value.code == "input_invalid" and "line 2" in info.value.reason


def test_iter_rows_from_s3(s3_bucket, s3_client):
    s3_client.put_object(Bucket=s3_bucket, Key="p.parquet", Body=_parquet_bytes(ROWS, 2))
    s3_client.put_object(Bucket=s3_bucket, Key="j.jsonl", Body=_jsonl_bytes(ROWS))
    assert list(iter_rows(f"s3://{s3_bucket}/p.parquet")) == ROWS
    assert list(iter_rows(f"s3://{s3_bucket}/j.jsonl")) == ROWS


def test_iter_rows_missing_is_input_missing(tmp_path, s3_bucket):
    for uri in (str(tmp_path / "none.jsonl"), f"s3://{s3_bucket}/none.parquet"):
        with pytest.raises(JobError) as info:
            list(iter_rows(uri))
        assert info.value.code == "input_missing"


def test_input_format():
    assert [input_format(u) for u in ("a.pq", "s3://b/x.PARQUET", "a.ndjson", "a.json")] == [
        "parquet", "parquet", "jsonl", "json"]


# ---- part by part: bounded memory for any input size ---------------------------------

from spotbatch.inputs import InputLimits, count_rows, open_input  # noqa: E402
from spotbatch.storage import S3Store  # noqa: E402

MANY = [{"id": i, "text": f"row-{i}"} for i in range(2500)]


def _parts(reader, size):
    total = reader.count()
    return [reader.read(start, min(total, start + size)) for start in range(0, total, size)]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_parts_read_in_order_equal_the_whole_input(tmp_path, fmt):
    path = tmp_path / f"many.{fmt}"
    path.write_bytes(_parquet_bytes(MANY, 700) if fmt == "parquet" else _jsonl_bytes(MANY))
    with open_input(str(path)) as reader:
        parts = _parts(reader, 333)  # parts straddle the 700-row groups and the 1024-row batches
    assert [i for ids, _ in parts for i in ids] == [str(r["id"]) for r in MANY]
    assert [v for _, values in parts for v in values] == [r["text"] for r in MANY]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_later_owner_starts_at_its_first_unfinished_part(tmp_path, fmt):
    path = tmp_path / f"many.{fmt}"
    path.write_bytes(_parquet_bytes(MANY, 700) if fmt == "parquet" else _jsonl_bytes(MANY))
    with open_input(str(path)) as reader:
        assert reader.read(1500, 1510) == ([str(i) for i in range(1500, 1510)], [f"row-{i}" for i in range(1500, 1510)])
        assert reader.read(2490, 2500)[0] == [str(i) for i in range(2490, 2500)]
        assert reader.read(0, 2)[0] == ["0", "1"]  # backwards starts over from the top


def test_jsonl_count_skips_blank_lines_and_parts_follow_records(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_bytes(b'{"id": 1, "text": "a"}\n\n   \n{"id": 2, "text": "b"}\r\n{"id": 3, "text": "c"}')
    with open_input(str(path)) as reader:
        assert reader.count() == 3
        assert reader.read(1, 3) == (["2", "3"], ["b", "c"])


def test_a_line_over_max_line_bytes_is_too_large_when_counting(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_bytes(_jsonl_bytes(ROWS) + b'{"id": 9, "text": "' + b"z" * 5000 + b'"}\n')
    with open_input(str(path), limits=InputLimits(max_line_bytes=4096)) as reader:
        err = _job_error(reader.count)
    assert err.code == "input_too_large" and "max_line_bytes (4096)" in err.reason
    assert "zzz" not in err.reason  # never the contents


def test_a_line_over_max_line_bytes_is_too_large_when_reading(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_bytes(b'{"id": 9, "text": "' + b"z" * 5000 + b'"}\n')
    with open_input(str(path), limits=InputLimits(max_line_bytes=4096)) as reader:
        assert _job_error(reader.read, 0, 1).code == "input_too_large"


def test_a_json_array_is_read_whole_within_max_document_bytes(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert read_rows(str(path)) == (["1", "2", "30"], ["alpha", "beta", "gamma"])
    err = _job_error(read_rows, str(path), limits=InputLimits(max_document_bytes=64))
    assert err.code == "input_too_large" and "JSONL" in err.reason


def test_a_slow_read_fails_the_job_as_input_timeout(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_bytes(_jsonl_bytes(MANY))
    with open_input(str(path), limits=InputLimits(read_timeout_s=1e-9)) as reader:
        err = _job_error(reader.read, 0, 2500)
    assert err.code == "input_timeout" and "input_read_timeout_s" in err.reason


def test_a_file_that_shrinks_after_the_count_fails_the_job(tmp_path):
    path = tmp_path / "shrinks.jsonl"
    path.write_bytes(_jsonl_bytes(MANY))
    with open_input(str(path)) as reader:
        total = reader.count()
        path.write_bytes(_jsonl_bytes(MANY[:10]))  # same inode, truncated
        err = _job_error(reader.read, 0, total)
    assert err.code == "input_invalid" and "changed while the job ran" in err.reason


@pytest.fixture
def s3_reads(monkeypatch):
    """The byte ranges every S3 GET of an input asked for."""
    ranges = []
    real = S3Store._get_range.__wrapped__  # under S3_RETRY: record each attempt once

    def recording(self, bucket, key, etag, start, stop):
        ranges.append((start, stop))
        return real(self, bucket, key, etag, start, stop)

    monkeypatch.setattr(S3Store, "_get_range", recording)
    return ranges


def test_s3_parquet_count_reads_the_footer_not_the_object(s3_bucket, s3_client, s3_reads):
    rand = random.Random(0)  # incompressible text: the file is as big as it looks
    data = _parquet_bytes([{"id": i, "text": rand.randbytes(128).hex()} for i in range(40_000)], 5000)
    assert len(data) > 8 * 1024 * 1024  # more than two GET blocks
    s3_client.put_object(Bucket=s3_bucket, Key="big.parquet", Body=data)
    assert count_rows(f"s3://{s3_bucket}/big.parquet") == 40_000
    assert sum(stop - start for start, stop in s3_reads) < len(data) // 2


def test_s3_jsonl_streams_in_blocks(s3_bucket, s3_client, s3_reads):
    data = _jsonl_bytes([{"id": i, "text": "x" * 200} for i in range(50_000)])
    s3_client.put_object(Bucket=s3_bucket, Key="big.jsonl", Body=data)
    with open_input(f"s3://{s3_bucket}/big.jsonl") as reader:
        assert reader.count() == 50_000
        ids, _ = reader.read(49_990, 50_000)
    assert ids == [str(i) for i in range(49_990, 50_000)]
    assert max(stop - start for start, stop in s3_reads) <= 4 * 1024 * 1024  # one block per GET


def test_s3_object_replaced_while_read_fails_the_job(s3_bucket, s3_client):
    data = _jsonl_bytes([{"id": i, "text": "x" * 200} for i in range(50_000)])
    s3_client.put_object(Bucket=s3_bucket, Key="moving.jsonl", Body=data)
    with open_input(f"s3://{s3_bucket}/moving.jsonl") as reader:
        reader.read(0, 10)  # the first block is buffered
        s3_client.put_object(Bucket=s3_bucket, Key="moving.jsonl", Body=data.replace(b"x", b"y"))
        err = _job_error(reader.read, 10, 50_000)
    assert err.code == "input_unreadable" and "replaced" in err.reason
