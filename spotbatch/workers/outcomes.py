"""Outcomes: how a job ends, and when its offset may be committed.

A job ends written (its output durable) or dead-lettered. Either way the records that
say so (its status, and its dead letter) go to the broker first; only once the broker
has acknowledged them is the job's offset done, and the lowest offset not done bounds
what is committed (see offsets.py). So a crash after a commit cannot drop a dead letter
or a status, and a send the broker refuses stops the worker before any commit past it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from kafka.structs import TopicPartition

from spotbatch.errors import JobError
from spotbatch.workers.broker import CommitFailed, JobConsumer
from spotbatch.workers.offsets import OffsetTracker

__all__ = ["Outcomes"]

log = logging.getLogger("spotbatch.worker")


class Outcomes:
    """Sends each job's closing records and commits what they make safe (owner thread)."""

    def __init__(self, streams: Any, tracker: OffsetTracker, epoch_of: Callable[[TopicPartition], int | None],
                 metrics: Any, stats: Any, usage: Any, *, after_commit: Callable[[], None] = lambda: None) -> None:
        self._streams, self._tracker, self._epoch_of = streams, tracker, epoch_of
        self._metrics, self._stats, self._usage = metrics, stats, usage
        self._after_commit = after_commit
        # (record, epoch, sends): the record's offset is done once every send is acked.
        self._unacked: list[tuple[Any, int, list]] = []

    @property
    def waiting(self) -> int:
        """Jobs whose closing records the broker has not acknowledged yet."""
        return len(self._unacked)

    def written(self, record: Any, epoch: int, job_id: str, **fields: Any) -> None:
        """A job's output is durable: count it and send its ok status."""
        self._stats.jobs_ok += 1
        self._usage.add_job()
        self._metrics.jobs.labels("ok").inc()
        self.ok(record, epoch, job_id, **fields)

    def ok(self, record: Any, epoch: int, job_id: str, **fields: Any) -> None:
        status = self._streams.status(record.topic, job_id, status="ok", key=record.key, source=_coords(record),
                                      **fields)
        self._unacked.append((record, epoch, [status]))

    def dead_letter(self, record: Any, epoch: int, err: JobError, job_id: str | None = None) -> None:
        job_id = job_id or _job_id_of(record)
        log.warning("dead-letter %s partition=%d offset=%d: %s", job_id or "<unparsed>", record.partition,
                    record.offset, err)
        self._stats.jobs_failed += 1
        self._metrics.jobs.labels("failed").inc()
        self._metrics.errors.labels(err.code).inc()
        dead = self._streams.dead_letter(record, err)
        status = self._streams.status(record.topic, job_id, status="failed", key=record.key, error=err.code,
                                      reason=err.reason, source=_coords(record))
        self._unacked.append((record, epoch, [dead, status]))

    def collect_acks(self) -> None:
        """Mark done the offsets whose records are all acknowledged, in bulk."""
        done = [all(send.is_done for send in sends) for _, _, sends in self._unacked]
        if not any(done):
            return
        finished = [item for item, flag in zip(self._unacked, done) if flag]
        self._unacked = [item for item, flag in zip(self._unacked, done) if not flag]
        for record, epoch, sends in finished:
            if failed := [s for s in sends if not s.succeeded()]:  # never commit past a lost record
                raise RuntimeError(f"side-stream write failed for offset {record.offset}: {failed[0].exception}")
            tp = TopicPartition(record.topic, record.partition)
            if self._epoch_of(tp) == epoch:
                self._tracker.done(tp, record.offset)

    def commit(self, consumer: JobConsumer, owned: set[TopicPartition]) -> None:
        """One commit for everything that became durable since the last one."""
        offsets = self._tracker.to_commit(only=owned)
        if offsets:
            try:
                consumer.commit({tp: meta.offset for tp, meta in offsets.items()})
                self._tracker.committed(offsets)
                self._after_commit()
            except CommitFailed as exc:  # a rebalance overtook us; its events follow
                log.warning("commit of %d partitions failed: %s", len(offsets), exc)
        for tp in owned:
            hw, pos = consumer.highwater(tp), self._tracker.position(tp)
            if hw is not None and pos is not None:
                self._metrics.lag.labels(str(tp.partition)).set(max(0, hw - pos))


def _coords(record: Any) -> dict[str, Any]:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}


def _job_id_of(record: Any) -> str | None:
    """Best effort: a rejected job's id, if its JSON got that far, for the status record."""
    try:
        job_id = json.loads(record.value).get("job_id")
    except Exception:  # noqa: BLE001 - malformed input is exactly the case here
        return None
    return job_id if isinstance(job_id, str) else None
