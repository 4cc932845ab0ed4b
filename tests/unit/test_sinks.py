"""ParquetSink: names from the job id, typed columns, atomic overwrite on redelivery."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spotbatch.errors import JobError
from spotbatch.testing.store import MemoryStore
from spotbatch.workers.sinks import ParquetSink, build_table, read_table
from tests.fixtures_s3 import s3_bucket, s3_client, s3_endpoint  # noqa: F401


def _outputs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = [f"row-{i}" for i in range(n)]
    embedding = rng.standard_normal((n, 384)).astype(np.float32)
    score = rng.standard_normal(n).astype(np.float64)
    return ids, {"embedding": embedding, "score": score}


def _assert_round_trip(table: pa.Table, ids, columns):
    assert table.column_names == ["id", "embedding", "score"]
    assert table.schema.field("id").type == pa.string()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert table.column("id").to_pylist() == ids
    got = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(len(ids), 384)
    np.testing.assert_array_equal(got, columns["embedding"])
    np.testing.assert_array_equal(table.column("score").to_numpy(), columns["score"])


# -- names ----------------------------------------------------------------------------


def test_output_uri_local(tmp_path):
    sink = ParquetSink(str(tmp_path / "out"))
    root = str(tmp_path / "out")
    assert sink.output_uri("job-1") == f"{root}/job-1.parquet"
    assert sink.output_uri("job-1", f"{root}/team/a") == f"{root}/team/a/job-1.parquet"
    assert sink.output_uri("job-1", f"file://{root}/x/../y") == f"{root}/y/job-1.parquet"
    assert sink.part_uri("job-1", None, 3) == f"{root}/job-1/part-00003.parquet"
    assert sink.manifest_uri("job-1", "team") == f"{root}/team/job-1/_manifest.json"


def test_output_uri_s3():
    sink = ParquetSink("s3://bkt/results/")
    assert sink.output_uri("j") == "s3://bkt/results/j.parquet"
    assert sink.output_uri("j", "s3://bkt/results/day1") == "s3://bkt/results/day1/j.parquet"


def test_relative_output_prefix_is_under_root_wherever_the_worker_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the root: a cwd-relative reading would be rejected
    local, s3 = ParquetSink(str(tmp_path / "data" / "out")), ParquetSink("s3://bkt/results")
    assert local.output_uri("j", "run-7/") == f"{tmp_path}/data/out/run-7/j.parquet"
    assert s3.output_uri("j", "run-7") == "s3://bkt/results/run-7/j.parquet"
    with pytest.raises(JobError) as info:
        local.output_uri("j", "../escape")
    assert info.value.code == "output_outside_prefix"


@pytest.mark.parametrize("prefix", [
    "/elsewhere", "{root}side", "{root}/../x", "s3://bkt/results", "s3://bkt/outside",
])
def test_output_prefix_outside_root_is_rejected(tmp_path, prefix):
    root = str(tmp_path / "out")
    with pytest.raises(JobError) as info:
        ParquetSink(root).output_uri("j", prefix.format(root=root))
    assert info.value.code == "output_outside_prefix"


@pytest.mark.parametrize("job_id", ["", ".", "..", "../x", "a/b", "a\\b", "a\x00b"])
def test_unsafe_job_ids_cannot_name_outputs(job_id):
    with pytest.raises(JobError) as info:
        ParquetSink("s3://bkt/out").output_uri(job_id)
    assert info.value.code == "invalid_job"


# -- tables ---------------------------------------------------------------------------


def test_build_table_rejects_bad_columns():
    ids, cols = _outputs(3, 0)
    with pytest.raises(ValueError, match="rows"):
        build_table(ids[:2], cols)
    with pytest.raises(ValueError, match="reserved"):
        build_table(ids, {"id": np.arange(3)})
    with pytest.raises(ValueError, match="3-D"):
        build_table(ids, {"t": np.zeros((3, 2, 2), np.float32)})


def test_empty_output_keeps_types():
    table = build_table([], {"embedding": np.zeros((0, 4), np.float32)})
    assert table.num_rows == 0 and table.schema.field("embedding").type == pa.list_(pa.float32(), 4)


# -- writes ---------------------------------------------------------------------------


def test_local_round_trip_and_redelivery_overwrites(tmp_path):
    sink = ParquetSink(str(tmp_path))
    uri = sink.output_uri("job-7", str(tmp_path / "sub"))
    ids, cols = _outputs(5, seed=1)
    sink.write(uri, ids, cols)
    _assert_round_trip(read_table(uri), ids, cols)
    assert pq.ParquetFile(uri).metadata.row_group(0).column(0).compression == "ZSTD"

    new_ids, new_cols = _outputs(4, seed=2)  # the redelivered job computes again
    sink.write(uri, new_ids, new_cols)
    assert os.listdir(tmp_path / "sub") == ["job-7.parquet"]  # one file, no temp leftovers
    _assert_round_trip(read_table(uri), new_ids, new_cols)


def test_s3_round_trip_and_redelivery_overwrites(s3_bucket, s3_client):
    sink = ParquetSink(f"s3://{s3_bucket}/results")
    uri = sink.output_uri("job-9")
    ids, cols = _outputs(6, seed=3)
    sink.write(uri, ids, cols)
    _assert_round_trip(read_table(uri), ids, cols)

    new_ids, new_cols = _outputs(2, seed=4)
    sink.write(uri, new_ids, new_cols)
    listed = s3_client.list_objects_v2(Bucket=s3_bucket)
    assert [o["Key"] for o in listed["Contents"]] == ["results/job-9.parquet"]
    _assert_round_trip(read_table(uri), new_ids, new_cols)


def test_injected_store_is_used():
    store = MemoryStore()
    sink = ParquetSink("s3://bkt/out", store=store)
    ids, cols = _outputs(2, seed=5)
    sink.write(sink.output_uri("m"), ids, cols)
    assert list(store.objects) == ["s3://bkt/out/m.parquet"]
    _assert_round_trip(read_table("s3://bkt/out/m.parquet", store=store), ids, cols)
