"""Preemption with real worker processes: resume from checkpoints, spot notices, poison jobs."""

from __future__ import annotations

import json
import signal

import pyarrow.parquet as pq
import pytest

from spotbatch.kafka_admin import committed_offsets, ensure_topics, read_all
from spotbatch.workers.streams import dlq_topic
from tests.fake_metadata import FakeAws
from tests.integration.helpers import (
    assert_committed_to_end,
    assert_job_output,
    job_offsets,
    list_outputs,
    make_jobs,
    make_topic,
    new_group,
    publish,
    send_raw,
    spawn_worker,
    wait_ok,
    wait_until,
)

pytestmark = pytest.mark.integration


def _uri_job(job_id: str, path) -> bytes:
    return json.dumps({"job_id": job_id, "model": "tiny", "inputs": {"uri": str(path)}}).encode()


def _corpus(tmp_path, n: int):
    ids, texts = [f"r{i:04d}" for i in range(n)], [f"row {i} of a large job " * (i % 3 + 1) for i in range(n)]
    path = tmp_path / "in" / "big.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts)))
    return ids, texts, path


def test_large_job_resumes_after_sigkill_and_skips_finished_parts(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 1), new_group(), tmp_path / "out"
    ids, texts, path = _corpus(tmp_path, 120)
    send_raw(kafka_bootstrap, topic, [(b"big", _uri_job("big", path))])
    args = ["--checkpoint-interval", "10rows", "--max-batch-rows", "10"]

    first = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, name="first", args=args,
                         env={"SPOTBATCH_CHAOS": "after_write:4"})
    assert first.wait() == -signal.SIGKILL, first.describe()
    checkpoint = json.loads((out / "_checkpoints" / "big.json").read_text())
    done_before = checkpoint["parts_done"]
    assert checkpoint["parts_total"] == 12 and len(done_before) >= 3 and not checkpoint["complete"]
    assert "_manifest.json" not in list_outputs(out / "big")
    stamps = {i: (out / "big" / f"part-{i:05d}.parquet").stat() for i in done_before}

    second = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, name="second", args=args)
    wait_ok(second)

    parts = {f"part-{i:05d}.parquet" for i in range(12)}
    assert {n for n in list_outputs(out / "big") if not n.startswith(".")} == parts | {"_manifest.json"}
    for i, before in stamps.items():  # finished parts were skipped, not redone
        after = (out / "big" / f"part-{i:05d}.parquet").stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert_job_output(pq.read_table(out / "big"), ids, texts)
    final = json.loads((out / "_checkpoints" / "big.json").read_text())
    assert final["complete"] and final["attempts"] == 2 and final["rows_done"] == 120
    manifest = json.loads((out / "big" / "_manifest.json").read_text())
    assert manifest["rows"] == 120 and manifest["parts"] == sorted(parts)
    assert_committed_to_end(kafka_bootstrap, group, topic)


def test_redelivered_complete_job_is_committed_without_work(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 1), new_group(), tmp_path / "out"
    ids, texts, path = _corpus(tmp_path, 30)
    send_raw(kafka_bootstrap, topic, [(b"once", _uri_job("once", path))])
    wait_ok(spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, name="first"))
    stamp = (out / "once" / "part-00000.parquet").stat()

    # The same job again (a producer retry, or a replay): its manifest says it is done.
    send_raw(kafka_bootstrap, topic, [(b"once", _uri_job("once", path))])
    wait_ok(spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, name="second"))
    assert (out / "once" / "part-00000.parquet").stat().st_mtime_ns == stamp.st_mtime_ns
    assert "already complete" in (tmp_path / "second.log").read_text()
    assert_committed_to_end(kafka_bootstrap, group, topic)


def test_poison_job_goes_to_dlq_with_attempt_history(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 1), new_group(), tmp_path / "out"
    _, _, path = _corpus(tmp_path, 40)
    send_raw(kafka_bootstrap, topic, [(b"poison", _uri_job("poison", path))])
    args = ["--checkpoint-interval", "10rows", "--max-batch-rows", "10", "--max-attempts", "2"]
    # Killed right after its first part, twice; its checkpoint is rolled back each time,
    # as if the crash came just before the part was recorded: no progress either time.
    for n in range(2):
        w = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, name=f"crash{n}", args=args,
                         env={"SPOTBATCH_CHAOS": "after_write:1"})
        assert w.wait() == -signal.SIGKILL, w.describe()
        cp = out / "_checkpoints" / "poison.json"
        cp.write_text(json.dumps({**json.loads(cp.read_text()), "parts_done": [], "rows_done": 0}))
    wait_ok(spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, name="last", args=args))
    (dead,) = read_all(kafka_bootstrap, dlq_topic(topic))
    headers = dict(dead.headers)
    assert headers["spotbatch.error.code"] == b"too_many_attempts"
    assert b"limit 2" in headers["spotbatch.error.reason"]
    assert not (out / "_checkpoints" / "poison.json").exists()  # a fixed republish starts afresh
    assert_committed_to_end(kafka_bootstrap, group, topic)


def test_aws_spot_notice_drains_and_records_the_interruption(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 2), new_group(), tmp_path / "out"
    ensure_topics(kafka_bootstrap, {"spotbatch.usage": 1})
    jobs = make_jobs(5000, 2, "spot")  # more than it can finish between the first outputs and the notice
    publish(kafka_bootstrap, topic, jobs)
    with FakeAws() as aws:
        worker = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, burst=False,
                              args=["--notice-source", "aws", "--drain-s", "5"],
                              env={"SPOTBATCH_AWS_METADATA_URL": aws.url, "SPOTBATCH_NOTICE_POLL_S": "0.1",
                                   "SPOTBATCH_MAX_PENDING_ROWS": "4096"})  # holds less than all 10,000 rows at once
        wait_until(lambda: len(list_outputs(out)) >= 5, 60, "first outputs", workers=[worker])
        aws.notice(action="terminate", in_s=120)
        assert worker.wait(30) == 0, worker.describe()
        polls = aws.requests_to("/latest/meta-data/spot/instance-action")
        assert polls and all(r.headers.get("x-aws-ec2-metadata-token") for r in polls)
    log = (tmp_path / "worker.log").read_text()
    assert "terminate notice from aws" in log
    usage = [json.loads(r.value) for r in read_all(kafka_bootstrap, "spotbatch.usage")]
    mine = [u for u in usage if u.get("kind") == "interruption" and u["reason"].startswith("aws")]
    assert len(mine) == 1 and 0 <= mine[0]["drain_s"] <= 6 and mine[0]["rows_lost"] >= 0
    # Everything committed has its output; the rest is still there for the next worker.
    offsets = job_offsets(kafka_bootstrap, topic)
    committed = committed_offsets(kafka_bootstrap, group, topic)
    written = {n.removesuffix(".parquet") for n in list_outputs(out)}
    for (partition, offset), job_id in offsets.items():
        if offset < committed.get(partition, 0):
            assert job_id in written
    assert len(written) < len(jobs)


def test_rebalance_recommendation_holds_new_large_jobs_then_resumes(kafka_bootstrap, tmp_path):
    """After AWS's rebalance recommendation a worker starts no URI job for
    rebalance_hold_s: the partition waits at the job, uncommitted, with the inline jobs
    before it done; once the hold ends, the rest runs."""
    topic, group, out = make_topic(kafka_bootstrap, 1), new_group(), tmp_path / "out"
    _, _, path = _corpus(tmp_path, 30)
    before, after = make_jobs(3, 2, "before"), make_jobs(3, 2, "after")
    with FakeAws() as aws:
        worker = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, burst=False,
                              args=["--notice-source", "aws", "--rebalance-hold-s", "15"],
                              env={"SPOTBATCH_AWS_METADATA_URL": aws.url, "SPOTBATCH_NOTICE_POLL_S": "0.1"})
        aws.rebalance()
        wait_until(lambda: "rebalance recommendation" in worker.log_path.read_text(), 30, "the recommendation",
                   workers=[worker])
        publish(kafka_bootstrap, topic, before)
        send_raw(kafka_bootstrap, topic, [(b"big", _uri_job("big", path))])
        publish(kafka_bootstrap, topic, after)
        wait_until(lambda: committed_offsets(kafka_bootstrap, group, topic).get(0) == 3, 60,
                   "the jobs before the large one committed", workers=[worker])
        held = list_outputs(out)
        assert "holding partition 0 at large job big" in worker.log_path.read_text(), worker.describe()
        assert {f"{j.job_id}.parquet" for j in before} <= held and "big" not in held, held
        assert not {f"{j.job_id}.parquet" for j in after} & held, held
        wait_until(lambda: committed_offsets(kafka_bootstrap, group, topic).get(0) == 7, 60,
                   "everything committed after the hold", workers=[worker])
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.describe()
    assert "_manifest.json" in list_outputs(out / "big")
    assert {f"{j.job_id}.parquet" for j in after} <= list_outputs(out)
