"""The worker loop on the in-memory broker: commit order, rebalances, pacing.

The Worker is built exactly as the CLI builds it (the tiny model, Parquet outputs in a
temp folder) with ``broker=MemoryBroker()``: fast, deterministic tests of what the
integration tests can only show in aggregate.
"""

from __future__ import annotations

import json
import threading
import time

import pyarrow.parquet as pq
import pytest
from kafka.structs import TopicPartition

from spotbatch.config import load_settings
from spotbatch.models.runner import BatchRunner
from spotbatch.models.tiny import TinyHandler
from spotbatch.testing.broker import MemoryBroker
from spotbatch.workers import Worker, build_worker
from spotbatch.workers.sinks import ParquetSink
from spotbatch.workers.streams import dlq_topic, results_topic

pytestmark = pytest.mark.usefixtures("clean_env")

TOPIC = "jobs"


def _settings(tmp_path, **overrides):
    return load_settings(topic=TOPIC, group="g", model="tiny", device="cpu", output=str(tmp_path / "out"),
                         max_wait_ms=5, metrics_port=0, **overrides)


def _job(i: int, rows: int = 3) -> bytes:
    return json.dumps({"job_id": f"job-{i}", "model": "tiny",
                       "inputs": {"rows": [{"id": f"{i}-{r}", "text": f"text {i} {r}"} for r in range(rows)]}}).encode()


def _publish(broker: MemoryBroker, n: int, partitions: int = 2, start: int = 0) -> None:
    for i in range(start, start + n):
        broker.publish(TOPIC, _job(i), key=f"job-{i}".encode(), partition=i % partitions)


def _turn_until(worker, done, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while not done():
        assert time.monotonic() < deadline, "the loop did not get there"
        worker.turn()


def _outputs(tmp_path) -> set[str]:
    return {p.stem for p in (tmp_path / "out").rglob("*.parquet")}


@pytest.fixture
def broker():
    b = MemoryBroker()
    b.create_topic(TOPIC, partitions=2)
    return b


def test_burst_run_writes_every_job_and_commits_to_the_log_end(tmp_path, broker):
    _publish(broker, 20)
    stats = build_worker(_settings(tmp_path), burst=True, broker=broker).run()
    assert stats.jobs_ok == 20 and stats.rows == 60
    assert broker.committed("g", TOPIC) == broker.log_end(TOPIC) == {0: 10, 1: 10}
    assert _outputs(tmp_path) == {f"job-{i}" for i in range(20)}
    statuses = [json.loads(r.value) for r in broker.records(results_topic(TOPIC))]
    assert sorted(s["job_id"] for s in statuses if s["status"] == "ok") == sorted(f"job-{i}" for i in range(20))
    table = pq.read_table(next((tmp_path / "out").rglob("job-7.parquet")))
    assert table.column("id").to_pylist() == ["7-0", "7-1", "7-2"]


def test_a_malformed_message_is_dead_lettered_and_committed_past(tmp_path, broker):
    broker.publish(TOPIC, b"{not json", partition=0)
    broker.publish(TOPIC, _job(1), partition=0)
    build_worker(_settings(tmp_path), burst=True, broker=broker).run()
    (dead,) = broker.records(dlq_topic(TOPIC))
    assert dead.value == b"{not json"
    assert dict(dead.headers)["spotbatch.error.code"] == b"malformed_json"
    assert broker.committed("g", TOPIC)[0] == 2
    assert _outputs(tmp_path) == {"job-1"}


def test_no_offset_is_committed_before_the_broker_acks_its_status(tmp_path, broker):
    _publish(broker, 6)
    worker = build_worker(_settings(tmp_path), broker=broker)
    worker.start()
    broker.hold_acks()
    _turn_until(worker, lambda: len(_outputs(tmp_path)) == 6)
    for _ in range(5):
        worker.turn()
    assert set(broker.committed("g", TOPIC).values()) <= {0}  # durable, but the statuses are unacknowledged
    broker.release_acks()
    _turn_until(worker, lambda: broker.committed("g", TOPIC) == {0: 3, 1: 3})


def test_a_refused_status_stops_the_worker_without_committing(tmp_path, broker):
    _publish(broker, 4)
    broker.fail_sends_to(results_topic(TOPIC))
    with pytest.raises(RuntimeError, match="side-stream write failed"):
        build_worker(_settings(tmp_path), burst=True, broker=broker).run()
    assert set(broker.committed("g", TOPIC).values()) <= {0}
    assert len(_outputs(tmp_path)) >= 1  # outputs are idempotent: the next owner rewrites them


def test_a_revoked_partition_is_not_committed_then_resumes_from_its_commit(tmp_path, broker):
    _publish(broker, 4)
    worker = build_worker(_settings(tmp_path), broker=broker)
    worker.start()
    _turn_until(worker, lambda: broker.committed("g", TOPIC) == {0: 2, 1: 2})
    other = broker.consumer(_settings(tmp_path), "other")
    other.subscribe(TOPIC)  # the group rebalances: one partition each
    other.poll(0, 0)
    worker.turn()
    (assigned,) = _member(broker, worker).assignment()
    theirs = TopicPartition(TOPIC, 1 - assigned.partition)
    _publish(broker, 8, start=4)  # 4 new jobs on each partition
    _turn_until(worker, lambda: broker.committed("g", TOPIC)[assigned.partition] == 6)
    assert broker.committed("g", TOPIC)[theirs.partition] == 2  # never committed by us after the revoke
    other.close()  # the other member leaves without doing its jobs: ours again, from its commit
    _turn_until(worker, lambda: broker.committed("g", TOPIC) == {0: 6, 1: 6})
    assert _outputs(tmp_path) == {f"job-{i}" for i in range(12)}


def test_a_full_backlog_pauses_every_partition(tmp_path, broker):
    gate = threading.Event()
    _publish(broker, 40)
    settings = _settings(tmp_path, max_batch_rows=4, max_pending_rows=12)
    runner = BatchRunner(TinyHandler(), device="cpu")
    blocked = lambda values, params: (gate.wait(10), runner.run(values, params))[1]  # noqa: E731
    worker = Worker(settings, runner.handler, blocked, ParquetSink(settings.output), broker=broker)
    worker.start()
    member = _member(broker, worker)
    _turn_until(worker, lambda: member.paused() == member.assignment() != set())
    for _ in range(5):
        worker.turn()
    fetched = sum(member.position(tp) for tp in member.assignment())
    assert member.paused() == member.assignment()
    assert 4 <= fetched <= 8  # held near max_pending_rows (12 rows of 3-row jobs), not the 40 published
    gate.set()
    _turn_until(worker, lambda: broker.committed("g", TOPIC) == {0: 20, 1: 20})


def _member(broker, worker):
    (member,) = [m for m in broker.members("g") if m.client_id == worker.worker_id]
    return member
