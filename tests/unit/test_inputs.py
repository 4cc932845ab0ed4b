"""inputs: Parquet and JSONL rows from local paths, file:// and S3 (moto over HTTP)."""

from __future__ import annotations

import io
import json

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
