"""The worker: consume -> batch -> infer -> write -> commit.

Threads (dramatiq's split): this module's owner thread is the only one that touches
the Kafka consumer. The inference thread runs the model; a small I/O pool reads
input files and writes outputs. Completed work flows back to the owner, which
commits. An offset is committed only once its job is durable: its Parquet file
written, or its dead letter acknowledged by the broker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import TopicPartition

from spotbatch import chaos
from spotbatch.config import Settings
from spotbatch.errors import JobError
from spotbatch.jobs import parse_job
from spotbatch.retry import kafka_retry, model_retry
from spotbatch.checkpointing import CheckpointInterval, CheckpointStore, store_for_checkpoints
from spotbatch.workers.batcher import Batcher, PendingJob
from spotbatch.workers.inference import BatchResult, InferenceThread
from spotbatch.workers.intake import Intake
from spotbatch.workers.metrics import WorkerMetrics
from spotbatch.workers.offsets import OffsetTracker
from spotbatch.workers.parts import PartPlanner
from spotbatch.workers.streams import SideStreams

__all__ = ["Worker", "WorkerStats"]

log = logging.getLogger("spotbatch.worker")

_POLL_IDLE_MS = 100  # FACTS: poll(0) with every partition paused spins a core
_POLL_HUNGRY_MS = 20  # the model is about to run dry: stage more batches soon
_POLL_BUSY_MS = 50  # batches are staged; longer turns leave the GIL to inference
_BURST_DONE = "burst: caught up"  # a planned stop, not an interruption
_FINAL_RESERVE_S = 3.0  # of the drain deadline, kept for commit + flush + leave


@dataclass
class WorkerStats:
    jobs_ok: int = 0
    jobs_failed: int = 0
    rows: int = 0


class _Listener(ConsumerRebalanceListener):
    """Runs on kafka-python's IO thread: it only records events for the owner.

    Blocking commits are not allowed here (FACTS); durable offsets are committed on
    every loop turn anyway, so a revoke loses at most the jobs still in flight,
    uncommitted, and the next owner redoes them into the same output files.
    """

    def __init__(self, events: list) -> None:
        self._events = events

    def on_partitions_revoked(self, revoked):
        self._events.append(("revoked", set(revoked)))

    def on_partitions_assigned(self, assigned):
        self._events.append(("assigned", set(assigned)))

    def on_partitions_lost(self, lost):
        self._events.append(("lost", set(lost)))


class Worker:
    def __init__(self, settings: Settings, handler: Any, run_batch: Any, sink: Any, *, burst: bool = False,
                 checkpoints: CheckpointStore | None = None) -> None:
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = WorkerMetrics()
        self.stats = WorkerStats()
        self._burst = burst
        self._stop_at: float | None = None  # the shared drain deadline once stopping
        self._events: list = []  # appended by the IO thread (list.append is atomic)
        self._owned: dict[TopicPartition, int] = {}  # partition -> ownership epoch
        self._epoch = 0
        self._tracker = OffsetTracker()
        self._batcher = Batcher(max_batch_rows=settings.max_batch_rows, max_wait_ms=settings.max_wait_ms)
        self.interval = CheckpointInterval(settings.checkpoint_interval, batch_rows=settings.max_batch_rows,
                                           mtbi_s=settings.mtbi_s)
        self._rows_per_s: float | None = None  # EWMA of inference throughput, sizes parts
        planner = PartPlanner(checkpoints or store_for_checkpoints(settings.checkpoint_location()), sink,
                              self.interval, owner=self.worker_id, max_attempts=settings.max_attempts,
                              rows_per_s=lambda: self._rows_per_s)
        self._intake = Intake(handler, sink, aliases=(settings.model,), planner=planner)
        self._live: set[PendingJob] = set()  # accepted units not yet durable or failed
        self._stop_reason = "stop requested"
        self._sink = sink
        # Stage as many closed batches as the backlog allows: a fast model (GPU) must not
        # wait for the owner's next turn between batches.
        staged = max(2, settings.max_pending_rows // settings.max_batch_rows)
        self._inference = InferenceThread(model_retry(run_batch), max_in_flight=staged)
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="io")
        self._loads: list[tuple[Any, int, Future]] = []  # (record, epoch, future of PendingJob)
        self._writes: list[tuple[PendingJob, float, Future]] = []
        self._acks: list[tuple[Any, int, Any]] = []  # (record, epoch, kafka future)
        self._idle_since: float | None = None
        self._rows_per_job = float(settings.max_batch_rows)  # learned; starts cautious
        self._consumer = self._make_consumer()
        # A broker blip (connection lost, coordinator moving) must not end the worker.
        self._poll = kafka_retry(self._consumer.poll)
        self._streams = SideStreams(self._make_producer(), self.worker_id)

    # ---- lifecycle -------------------------------------------------------------

    def request_stop(self, *, now: bool = False, within_s: float | None = None, reason: str = "stop requested") -> None:
        """Begin draining (signal- and thread-safe). ``now`` abandons in-flight work at once.

        ``within_s``: the time a spot notice leaves; the drain deadline is the sooner
        of it and ``drain_s``.
        """
        budget = self.settings.drain_s if within_s is None else max(0.0, min(self.settings.drain_s, within_s))
        deadline = time.monotonic() + (0.0 if now else budget)
        self._stop_reason = reason
        self._stop_at = deadline if self._stop_at is None else min(self._stop_at, deadline)

    def run(self) -> WorkerStats:
        self._consumer.subscribe([self.settings.topic], listener=_Listener(self._events))
        log.info("worker %s consuming topic=%s group=%s", self.worker_id, self.settings.topic, self.settings.group)
        try:
            try:
                while self._stop_at is None:
                    self._turn()
                    if self._burst and self._drained_for(2.0):
                        log.info("burst mode: caught up with the log end; stopping")
                        self.request_stop(reason=_BURST_DONE)
            except Exception:
                # An infrastructure fault (output store down, DLQ refused): keep what is
                # durable, leave the group so others take over, and let the caller exit 1.
                log.exception("fatal error; committing what is durable and leaving the group")
                self.request_stop(now=True)
                self._shutdown()
                raise
            self._shutdown()
        finally:
            self._io.shutdown(wait=False, cancel_futures=True)
            self._inference.stop()
        return self.stats

    def _shutdown(self) -> None:
        """Leave the group without losing a job; every step shares one deadline.

        1. Stop fetching: pause every partition (records already fetched stay unread).
        2. Drop queued parts of URI jobs: their finished parts are checkpointed, and
           the next owner resumes after them.
        3. Finish other accepted work: close batches without waiting for max_wait and
           keep turning until nothing is in flight, or only the final reserve is left;
           what does not fit is abandoned (at most the batches in flight).
        4. Commit what is durable. Unfinished work stays uncommitted: redelivered later.
        5. Record the interruption (rows lost, drain seconds) on the usage topic.
        6. Flush the side streams and close the consumer, which leaves the group.
        """
        started, deadline = time.monotonic(), self._stop_at
        self._consumer.pause(*self._consumer.assignment())
        # Queued parts of URI jobs are checkpointed and resumable: leave them at once.
        # They stay in _live, so the interruption record counts their inferred rows.
        self._batcher.drop(lambda unit: unit.parent is None)
        while self._busy() and time.monotonic() < deadline - _FINAL_RESERVE_S:
            self._turn(draining=True)
        if self._busy():
            log.warning("drain deadline reached: abandoning %d uncommitted jobs", self._tracker.outstanding())
        self._commit()
        if self._stop_reason != _BURST_DONE:
            self._report_interruption(time.monotonic() - started)
        try:  # statuses and usage records are best effort; the drain must still end
            self._streams.flush(timeout_s=max(0.5, deadline - time.monotonic()))
        except KafkaError as exc:
            log.warning("side streams not fully flushed before leaving: %s", exc)
        _close(self._consumer, leave=self._should_leave())
        log.info("worker %s left the group after %.1fs: %s", self.worker_id, time.monotonic() - started, self.stats)

    # ---- one turn of the owner loop -------------------------------------------

    def _turn(self, draining: bool = False) -> None:
        self._apply_rebalance_events()
        self._flow_control(draining)
        records = self._poll(timeout_ms=self._poll_ms(), max_records=self._room_in_records())
        rewound = self._apply_rebalance_events()  # the listener ran inside poll(): its news first
        for tp, recs in records.items():
            if tp in rewound:  # fetched from before the rewind: read again from there next turn
                if rewound[tp] is None:  # no commit to rewind to: these records come first
                    self._consumer.seek(tp, recs[0].offset)
                continue
            for record in recs:
                self._accept(record)
        self._collect_loads()
        self._collect_results()
        self._feed_inference(force=draining)
        self._collect_writes()
        self._collect_acks()
        self._commit()
        self.metrics.tick()

    def _apply_rebalance_events(self) -> dict[TopicPartition, int | None]:
        """Apply the listener's news; returns the partitions assigned now and where each
        was rewound to (None: no committed offset)."""
        rewound: dict[TopicPartition, int | None] = {}
        while self._events:
            kind, tps = self._events.pop(0)
            if kind == "assigned":
                self._epoch += 1
                self._owned.update({tp: self._epoch for tp in tps})
                rewound.update(self._rewind(tps))
                log.info("assigned %s", sorted(tp.partition for tp in tps))
                continue
            for tp in tps:  # revoked or lost: forget; in-flight results become stale
                self._owned.pop(tp, None)
                self._tracker.forget(tp)
            dropped = self._batcher.drop(self._is_current)
            self._forget(dropped)
            if tps:
                log.info("%s %s; abandoned %d queued jobs uncommitted", kind,
                         sorted(tp.partition for tp in tps), len(dropped))
        return rewound

    def _rewind(self, tps: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Start an assigned partition at its committed offset.

        kafka-python keeps the fetch position of a partition that stays assigned across
        a rebalance, but everything we fetched and had not committed was abandoned at
        the revoke: without the rewind those records would be skipped, and the next
        commit would move past them. A job lost that way never comes back.
        """
        targets = {tp: self._consumer.committed(tp) for tp in tps}
        for tp, committed in targets.items():
            if committed is not None:
                self._consumer.seek(tp, committed)
        return targets

    def _backlog_rows(self) -> int:
        """Rows accepted and not yet inferred; a job still loading counts as one batch."""
        in_flight = self._inference.in_flight + len(self._loads)
        return self._batcher.pending_rows + in_flight * self.settings.max_batch_rows

    def _room_in_records(self) -> int:
        """Records one poll may return without overshooting max_pending_rows by much."""
        room_rows = self.settings.max_pending_rows - self._backlog_rows()
        return max(1, min(500, int(room_rows / self._rows_per_job)))

    def _flow_control(self, draining: bool) -> None:
        # Re-applied every turn: newly assigned partitions start unpaused (FACTS).
        assigned = self._consumer.assignment()
        if draining or self._backlog_rows() >= self.settings.max_pending_rows:
            self._consumer.pause(*assigned)
        elif self._consumer.paused():
            self._consumer.resume(*self._consumer.paused())
        self.metrics.pending_rows.set(self._batcher.pending_rows)

    def _poll_ms(self) -> int:
        if self._inference.in_flight and self._inference.hungry and len(self._batcher):
            return _POLL_HUNGRY_MS
        if self._inference.in_flight or self._loads or self._writes:
            return _POLL_BUSY_MS
        due = self._batcher.seconds_until_due()
        return _POLL_IDLE_MS if due is None else max(1, min(_POLL_IDLE_MS, int(due * 1000)))

    def _accept(self, record: Any) -> None:
        tp = TopicPartition(record.topic, record.partition)
        epoch = self._owned.get(tp)
        if epoch is None:  # fetched just before a revoke: not ours to process any more
            return
        self._tracker.seen(tp, record.offset)
        try:
            job = parse_job(record.value)
            if Intake.needs_io(job):
                self._intake.check(job)  # fail fast on model/prefix before reading a file
                self._loads.append((record, epoch, self._io.submit(self._intake.build, job, record, epoch)))
            else:
                self._add(record, self._intake.build(job, record, epoch))
        except JobError as err:
            self._dead_letter(record, epoch, err)

    def _collect_loads(self) -> None:
        for record, epoch, fut in _take_done(self._loads, lambda item: item[2]):
            try:
                units = fut.result()
            except JobError as err:
                self._dead_letter(record, epoch, err)
                continue
            if self._owned.get(TopicPartition(record.topic, record.partition)) == epoch:
                self._add(record, units)

    def _add(self, record: Any, units: list[PendingJob]) -> None:
        if not units:  # a URI job a previous owner finished: nothing left but the commit
            log.info("job %s already complete (manifest found); committing", _job_id_of(record))
            self._tracker.done(TopicPartition(record.topic, record.partition), record.offset)
            return
        parted = units[0].parent
        if parted is not None:  # the checkpoint interval this job runs with
            part_rows = parted.progress.part_rows or units[0].rows
            self.metrics.part_rows.set(part_rows)
            tau = self.interval.interval_s()
            log.info("job %s: %d parts to do of %d, %d rows each (checkpoint interval %s%s)", parted.job.job_id,
                     len(units), parted.progress.parts_total, part_rows, self.settings.checkpoint_interval,
                     f" = {tau:.0f}s" if tau else "")
        # A running mean of rows per job sizes the next poll (see _room_in_records).
        self._rows_per_job += (sum(u.rows for u in units) - self._rows_per_job) * 0.1
        for unit in units:
            self._live.add(unit)
            self._batcher.add(unit)

    def _feed_inference(self, force: bool) -> None:
        while self._inference.can_take():
            batch = self._batcher.next_batch(force=force)
            if batch is None:
                return
            self._inference.submit(batch)

    def _collect_results(self) -> None:
        for result in self._inference.results():
            self._account(result)
            for seg, outputs in result.parts:
                job = seg.job
                if not self._is_current(job) or _failed(job):
                    self._live.discard(job)
                    continue
                job.add_part(seg.start, outputs)
                if job.complete:
                    self._writes.append((job, time.monotonic(), self._io.submit(self._write, job)))
            for job, err in result.failures:
                if self._is_current(job) and not _failed(job):
                    job.failed = True
                    if job.parent is not None:
                        job.parent.failed = True
                    self._dead_letter(job.record, job.epoch, err, job.job.job_id)
                self._live.discard(job)

    def _write(self, job: PendingJob) -> bool:
        """Make a unit durable (I/O thread); True when its whole job is now complete."""
        self._sink.write(job.output_uri, job.ids, job.outputs())
        if job.parent is None:
            chaos.reached("after_write")
            return True
        complete, cost_s = job.parent.part_done(job.part, job.rows)
        self.interval.observe_cost(cost_s)
        chaos.reached("after_write")
        return complete

    def _collect_writes(self) -> None:
        for job, _, fut in _take_done(self._writes, lambda item: item[2]):
            self._live.discard(job)
            complete = fut.result()  # an infrastructure fault raises and stops the worker
            if not complete:  # a part of a URI job: checkpointed, the job goes on
                self.metrics.parts.inc()
                continue
            self.stats.jobs_ok += 1
            self.metrics.jobs.labels("ok").inc()
            whole = job.parent
            started = whole.started_at if whole else job.accepted_at
            self._streams.status(
                job.record.topic, job.job.job_id, status="ok", key=job.record.key,
                rows=whole.rows if whole else job.rows, seconds=round(time.monotonic() - started, 3),
                output=whole.folder_uri if whole else job.output_uri, source=_coords(job.record),
            )
            if self._is_current(job):
                self._tracker.done(job.tp, job.record.offset)

    def _dead_letter(self, record: Any, epoch: int, err: JobError, job_id: str | None = None) -> None:
        job_id = job_id or _job_id_of(record)
        log.warning("dead-letter %s partition=%d offset=%d: %s", job_id or "<unparsed>", record.partition, record.offset, err)
        self.stats.jobs_failed += 1
        self.metrics.jobs.labels("failed").inc()
        self.metrics.errors.labels(err.code).inc()
        self._acks.append((record, epoch, self._streams.dead_letter(record, err)))
        self._streams.status(
            record.topic, job_id, status="failed", key=record.key,
            error=err.code, reason=err.reason, source=_coords(record),
        )

    def _collect_acks(self) -> None:
        for record, epoch, fut in _take_done(self._acks, lambda item: item[2], done=lambda f: f.is_done):
            if not fut.succeeded():  # the DLQ did not take it: never commit past it
                raise RuntimeError(f"dead-letter write failed for offset {record.offset}: {fut.exception}")
            tp = TopicPartition(record.topic, record.partition)
            if self._owned.get(tp) == epoch:
                self._tracker.done(tp, record.offset)

    def _commit(self) -> None:
        offsets = self._tracker.to_commit(only=set(self._owned))
        if not offsets:
            return
        try:
            self._consumer.commit(offsets)
            self._tracker.committed(offsets)
            chaos.reached("after_commit")
        except (CommitFailedError, KafkaError) as exc:  # a rebalance overtook us; events follow
            log.warning("commit of %d partitions failed: %s", len(offsets), exc)
        for tp in self._owned:
            hw, pos = self._consumer.highwater(tp), self._tracker.position(tp)
            if hw is not None and pos is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(0, hw - pos))

    # ---- helpers ---------------------------------------------------------------

    def _account(self, result: BatchResult) -> None:
        if result.seconds > 0:
            rate = result.batch.rows / result.seconds
            self._rows_per_s = rate if self._rows_per_s is None else 0.8 * self._rows_per_s + 0.2 * rate
        self.metrics.batch_rows.observe(result.batch.rows)
        self.metrics.batch_seconds.observe(result.seconds)
        self.metrics.rows.inc(result.batch.rows)
        self.stats.rows += result.batch.rows

    def _should_leave(self) -> bool:
        if self.settings.leave_group != "auto":
            return self.settings.leave_group == "always"
        # Measured on Tansu (the embedded broker): a LeaveGroup while another member's
        # join is pending wedges the group for good; without it, the session timeout
        # removes us and the group moves on. Real Kafka handles the leave correctly.
        cluster_id = getattr(getattr(self._consumer, "_client", None), "cluster", None)
        return getattr(cluster_id, "cluster_id", None) != "tansu_cluster"

    def _forget(self, units: list[PendingJob]) -> None:
        self._live.difference_update(units)

    def _report_interruption(self, drain_s: float) -> None:
        """One usage record per stop: what the interruption cost, for the cost report."""
        lost = sum(unit.rows_inferred for unit in self._live)
        self.metrics.rows_lost.inc(lost)
        self._streams.usage(self.settings.usage_topic, kind="interruption", reason=self._stop_reason,
                            drain_s=round(drain_s, 3), rows_lost=lost, units_abandoned=len(self._live),
                            rows=self.stats.rows, jobs_ok=self.stats.jobs_ok, jobs_failed=self.stats.jobs_failed)
        log.info("interruption (%s): drained in %.1fs, %d inferred rows lost", self._stop_reason, drain_s, lost)

    def _is_current(self, job: PendingJob) -> bool:
        return self._owned.get(job.tp) == job.epoch

    def _busy(self) -> bool:
        return bool(len(self._batcher) or self._inference.in_flight or self._loads or self._writes or self._acks)

    def _position(self, tp: TopicPartition) -> int:
        """Our committable position; without records since assignment, the fetch position."""
        pos = self._tracker.position(tp)
        return pos if pos is not None else self._consumer.position(tp)

    def _drained_for(self, seconds: float) -> bool:
        """Burst mode: nothing in flight and every owned partition read to its end."""
        caught_up = bool(self._owned) and not self._busy() and all(
            (hw := self._consumer.highwater(tp)) is not None and self._position(tp) >= hw for tp in self._owned
        )
        now = time.monotonic()
        if not caught_up:
            self._idle_since = None
            return False
        self._idle_since = self._idle_since or now
        return now - self._idle_since >= seconds

    def _make_consumer(self) -> KafkaConsumer:
        s = self.settings
        return KafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=s.group,
            client_id=self.worker_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(500, s.session_timeout_ms // 5),
            max_poll_interval_ms=s.max_poll_interval_ms,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes,
            fetch_max_bytes=max(s.max_partition_fetch_bytes, 52_428_800),
        )

    def _make_producer(self) -> KafkaProducer:
        return KafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            client_id=f"{self.worker_id}-side",
            acks="all",
            linger_ms=5,
            max_request_size=self.settings.max_partition_fetch_bytes,
        )


def _take_done(items: list, future_of, done=lambda f: f.done()) -> list:
    """Remove and return the items whose future has finished, keeping order."""
    flags = [done(future_of(item)) for item in items]  # read once: futures finish concurrently
    finished = [item for item, flag in zip(items, flags) if flag]
    if finished:
        items[:] = [item for item, flag in zip(items, flags) if not flag]
    return finished


def _close(consumer: KafkaConsumer, *, leave: bool) -> None:
    """Close the consumer; ``leave=False`` skips the LeaveGroup request.

    kafka-python has no public switch for that, so the coordinator's leave step is
    replaced for this one close. Offsets were committed before (shutdown step 4).
    """
    if not leave:
        consumer._coordinator.maybe_leave_group = lambda *args, **kwargs: None  # noqa: SLF001
    consumer.close(autocommit=False)


def _failed(unit: PendingJob) -> bool:
    return unit.failed or (unit.parent is not None and unit.parent.failed)


def _coords(record: Any) -> dict[str, Any]:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}


def _job_id_of(record: Any) -> str | None:
    """Best effort: a rejected job's id, if its JSON got that far, for the status record."""
    try:
        job_id = json.loads(record.value).get("job_id")
    except Exception:  # noqa: BLE001 - malformed input is exactly the case here
        return None
    return job_id if isinstance(job_id, str) else None
