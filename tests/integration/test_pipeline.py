"""The whole pipeline with real worker processes against a real broker.

jobs topic -> ``spotbatch worker --burst`` processes -> Parquet outputs (local folder or
S3 on moto) + ``.results`` / ``.dlq`` side streams + committed offsets at the log end.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from spotbatch.jobs import job_key
from spotbatch.kafka_admin import read_all
from spotbatch.workers.sinks import read_table
from spotbatch.workers.streams import dlq_topic
from tests.integration.helpers import (  # noqa: F401 - worker_procs is an autouse fixture
    assert_committed_to_end,
    assert_job_output,
    expected_embeddings,
    job_rows,
    list_outputs,
    make_jobs,
    make_topic,
    new_group,
    publish,
    send_raw,
    spawn_worker,
    statuses,
    wait_ok,
    worker_procs,
)

pytestmark = pytest.mark.integration


def _assert_outputs(folder, jobs) -> None:
    """Exactly one Parquet file per job (nothing else, no temp files), each correct."""
    assert list_outputs(folder) == {f"{j.job_id}.parquet" for j in jobs}
    for job in jobs:
        ids, values = job_rows(job)
        assert_job_output(pq.read_table(folder / f"{job.job_id}.parquet"), ids, values)


def test_two_workers_process_every_job_once(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 4), new_group(), tmp_path / "out"
    jobs = make_jobs(40, 5, "pipe")
    publish(kafka_bootstrap, topic, jobs)

    workers = [spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, name=f"worker-{i}") for i in range(2)]
    wait_ok(*workers)

    _assert_outputs(out, jobs)
    ends = assert_committed_to_end(kafka_bootstrap, group, topic)
    assert sum(ends.values()) == len(jobs)
    assert sum(1 for e in ends.values() if e) > 1  # the jobs really were spread over partitions
    ok = {s["job_id"] for s in statuses(kafka_bootstrap, topic) if s["status"] == "ok"}
    assert ok == {j.job_id for j in jobs}
    assert read_all(kafka_bootstrap, dlq_topic(topic)) == []


def test_job_larger_than_a_batch_is_reassembled_in_order(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 4), new_group(), tmp_path / "out"
    big = make_jobs(1, 50, "big")  # 50 rows -> 7 batches of at most 8 rows
    small = make_jobs(3, 3, "small", start=50)  # small jobs share batches with the big one's segments
    publish(kafka_bootstrap, topic, big + small)

    worker = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, args=["--max-batch-rows", "8"])
    wait_ok(worker)

    _assert_outputs(out, big + small)
    table = pq.read_table(out / "big-000000.parquet")
    assert table.num_rows == 50
    assert table.column("id").to_pylist() == [f"row-{i:06d}" for i in range(50)]
    assert_committed_to_end(kafka_bootstrap, group, topic)


def _job_json(job_id: str, **overrides) -> bytes:
    data = {"version": 1, "job_id": job_id, "model": "tiny",
            "inputs": {"rows": [{"id": "r1", "text": "hello"}, {"id": "r2", "text": "world"}]}}
    data.update(overrides)
    return json.dumps(data).encode()


def test_bad_input_goes_to_the_dlq_and_good_jobs_still_finish(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 4), new_group(), tmp_path / "out"
    good = make_jobs(6, 4, "good")
    rows_bad = [{"id": "r1", "text": "fine"}, {"id": "r2", "text": ""}]
    bad = {  # key -> (value bytes, expected error code)
        b"bad-json": (b'{"job_id": "bad-json", "model": ', "malformed_json"),
        b"bad-array": (b"[1, 2, 3]", "malformed_json"),
        b"bad-tombstone": (None, "malformed_json"),
        b"bad-version": (_job_json("bad-version", version=2), "unknown_version"),
        b"bad-id": (_job_json("bad/id"), "invalid_job"),
        b"bad-no-text": (_job_json("bad-no-text", inputs={"rows": [{"id": "r1", "body": "x"}]}), "invalid_job"),
        b"bad-model": (_job_json("bad-model", model="no-such-model"), "unknown_model"),
        b"bad-etc": (_job_json("bad-etc", output="/etc"), "output_outside_prefix"),
        b"bad-escape": (_job_json("bad-escape", output="../escape"), "output_outside_prefix"),
        b"bad-dotdot": (_job_json("bad-dotdot", output=f"{out}/../escape"), "output_outside_prefix"),
        b"bad-sibling": (_job_json("bad-sibling", output=f"{out}side"), "output_outside_prefix"),
        b"bad-missing": (_job_json("bad-missing", inputs={"uri": f"file://{tmp_path}/missing.jsonl"}), "input_missing"),
        b"bad-row": (_job_json("bad-row", inputs={"rows": rows_bad}), "row_rejected"),
    }
    # Interleave: good, bad, good, bad... so bad records sit between good ones on partitions.
    messages, good_iter = [], iter(good)
    for key, (value, _) in bad.items():
        job = next(good_iter, None)
        if job is not None:
            messages.append((job_key(job.job_id), job.to_bytes()))
        messages.append((key, value))
    messages += [(job_key(j.job_id), j.to_bytes()) for j in good_iter]
    coords = dict(zip((k for k, _ in messages), send_raw(kafka_bootstrap, topic, messages)))

    worker = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path)
    wait_ok(worker)

    _assert_outputs(out, good)  # no output for any bad job, and nothing outside `out`
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "escape").exists()
    assert not (tmp_path / "outside").exists()
    dead = read_all(kafka_bootstrap, dlq_topic(topic))
    # Dead letters are keyed by source coordinates; the original key is a header.
    keys = [dict(r.headers)["spotbatch.source.key"] for r in dead]
    assert sorted(keys) == sorted(bad)  # each bad one exactly once, no good one
    for rec, key in zip(dead, keys):
        value, code = bad[key]
        headers = {k: v.decode() for k, v in rec.headers}
        partition, offset = coords[key]
        assert rec.key == f"{topic}:{partition}:{offset}".encode(), key
        assert rec.value == value, key
        assert headers["spotbatch.error.code"] == code, (rec.key, headers)
        assert headers["spotbatch.error.reason"], rec.key
        assert headers["spotbatch.source.topic"] == topic
        assert (int(headers["spotbatch.source.partition"]), int(headers["spotbatch.source.offset"])) == (partition, offset)
    by_id = {s["job_id"]: s for s in statuses(kafka_bootstrap, topic)}
    assert {j.job_id for j in good} <= {i for i, s in by_id.items() if s["status"] == "ok"}
    assert by_id["bad-row"]["status"] == "failed" and by_id["bad-row"]["error"] == "row_rejected"
    assert by_id["bad-model"]["error"] == "unknown_model"
    ends = assert_committed_to_end(kafka_bootstrap, group, topic)
    assert sum(ends.values()) == len(messages)


def test_uri_inputs_jsonl_and_parquet(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 4), new_group(), tmp_path / "out"
    jsonl_ids, jsonl_texts = [f"j{i}" for i in range(7)], [f"json line number {i}" for i in range(7)]
    jsonl = tmp_path / "in" / "rows.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps({"id": i, "text": t, "extra": 1}) + "\n" for i, t in zip(jsonl_ids, jsonl_texts)))
    pq_ids, pq_texts = list(range(100, 111)), [f"parquet row {i} " * (i % 4 + 1) for i in range(11)]
    parquet = tmp_path / "in" / "rows.parquet"
    pq.write_table(pa.table({"key": pq_ids, "body": pq_texts, "other": [0.5] * 11}), parquet)
    messages = [
        (b"uri-jsonl", _job_json("uri-jsonl", inputs={"uri": f"file://{jsonl}"})),
        (b"uri-parquet", _job_json("uri-parquet", inputs={"uri": f"file://{parquet}", "id_column": "key",
                                                          "input_column": "body"})),
        (b"uri-plain-path", _job_json("uri-plain-path", inputs={"uri": str(jsonl)})),
    ]
    send_raw(kafka_bootstrap, topic, messages)

    worker = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path)
    wait_ok(worker)

    # URI jobs run in parts: <job_id>/part-NNNNN.parquet + _manifest.json, checkpoints aside.
    assert list_outputs(out) == {"uri-jsonl", "uri-parquet", "uri-plain-path"}
    for job_id in ("uri-jsonl", "uri-parquet", "uri-plain-path"):
        assert list_outputs(out / job_id) == {"part-00000.parquet", "_manifest.json"}
        assert json.loads((out / job_id / "_manifest.json").read_text())["parts"] == ["part-00000.parquet"]
    assert_job_output(pq.read_table(out / "uri-jsonl"), jsonl_ids, jsonl_texts)
    assert_job_output(pq.read_table(out / "uri-plain-path"), jsonl_ids, jsonl_texts)
    assert_job_output(pq.read_table(out / "uri-parquet"), [str(i) for i in pq_ids], pq_texts)
    assert read_all(kafka_bootstrap, dlq_topic(topic)) == []
    assert_committed_to_end(kafka_bootstrap, group, topic)


def test_s3_output_and_s3_input(kafka_bootstrap, s3_endpoint, s3_client, s3_bucket, tmp_path):
    topic, group = make_topic(kafka_bootstrap, 4), new_group()
    prefix = f"s3://{s3_bucket}/out"
    jobs = make_jobs(5, 4, "s3job")
    in_ids, in_texts = ["a", "b", "c"], ["from s3", "parquet input", "third row"]
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": in_ids, "text": in_texts}), buf)
    s3_client.put_object(Bucket=s3_bucket, Key="in.parquet", Body=buf.getvalue().to_pybytes())
    publish(kafka_bootstrap, topic, jobs)
    send_raw(kafka_bootstrap, topic, [
        (b"s3-in", _job_json("s3-in", inputs={"uri": f"s3://{s3_bucket}/in.parquet"})),
        (b"s3-sub", _job_json("s3-sub", output=f"{prefix}/sub")),
        (b"s3-other-bucket", _job_json("s3-other-bucket", output="s3://another-bucket/out")),
    ])

    # The worker inherits os.environ, where s3_endpoint put AWS_ENDPOINT_URL and fake keys.
    worker = spawn_worker(kafka_bootstrap, topic, group, prefix, tmp_path, input_prefixes=[f"s3://{s3_bucket}/"])
    wait_ok(worker)

    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])}
    ledgers = {k for k in keys if k.startswith("out/_checkpoints/_attempts/")}  # inline jobs' attempts
    assert ledgers and all(k.endswith(".json") for k in ledgers)
    keys -= ledgers
    expected = {f"out/{j.job_id}.parquet" for j in jobs} | {"out/sub/s3-sub.parquet"}
    parted = {"out/s3-in/part-00000.parquet", "out/s3-in/_manifest.json", "out/_checkpoints/s3-in.json"}
    assert keys == expected | parted | {"in.parquet"}
    for job in jobs:
        ids, values = job_rows(job)
        assert_job_output(read_table(f"{prefix}/{job.job_id}.parquet"), ids, values)
    assert_job_output(read_table(f"{prefix}/s3-in/part-00000.parquet"), in_ids, in_texts)
    assert_job_output(read_table(f"{prefix}/sub/s3-sub.parquet"), ["r1", "r2"], ["hello", "world"])
    dead = read_all(kafka_bootstrap, dlq_topic(topic))
    assert [(dict(r.headers)["spotbatch.source.key"], dict(r.headers)["spotbatch.error.code"]) for r in dead] == [
        (b"s3-other-bucket", b"output_outside_prefix")]
    assert_committed_to_end(kafka_bootstrap, group, topic)


def test_burst_worker_exits_when_a_partition_is_already_done(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 2), new_group(), tmp_path / "out"
    done, todo = make_jobs(2, 2, "done"), make_jobs(1, 2, "todo", start=4)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    try:
        for partition, job in [(0, done[0]), (0, done[1]), (1, todo[0])]:
            producer.send(topic, key=job_key(job.job_id), value=job.to_bytes(), partition=partition).get(30)
    finally:
        producer.close()
    # Partition 0 was finished by some earlier worker: the group committed its end.
    committer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    try:
        committer.assign([TopicPartition(topic, 0)])
        committer.commit({TopicPartition(topic, 0): OffsetAndMetadata(2, "", -1)})
    finally:
        committer.close()

    worker = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path)
    wait_ok(worker, timeout_s=30)  # joins in ~3 s, then 2 s caught up

    assert list_outputs(out) == {"todo-000000.parquet"}
    assert_committed_to_end(kafka_bootstrap, group, topic)


def test_expected_embeddings_depend_on_the_text():
    # Guards the oracle itself: a constant model would make every output check vacuous.
    a, b = expected_embeddings(["hello", "a different text"])
    assert not (a == b).all()
