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
from spotbatch.errors import JobError, job_error_from
from spotbatch.input_access import InputPolicy
from spotbatch.inputs import InputLimits
from spotbatch.jobs import InlineInputs, Job, parse_job
from spotbatch.kafka_security import client_options
from spotbatch.retry import kafka_retry, model_retry
from spotbatch.checkpointing import CheckpointInterval, CheckpointStore, store_for_checkpoints
from spotbatch.storage import join_uri, store_for
from spotbatch.workers.admission import Admission
from spotbatch.workers.attempts import AttemptLedger
from spotbatch.workers.batcher import Batcher, PendingJob
from spotbatch.workers.inference import BatchResult, InferenceThread
from spotbatch.workers.intake import Intake
from spotbatch.workers.metrics import WorkerMetrics
from spotbatch.workers.offsets import OffsetTracker
from spotbatch.workers.parts import PartFeed, PartPlanner
from spotbatch.workers.streams import SideStreams
from spotbatch.workers.usage import UsageMeter

__all__ = ["Worker", "WorkerStats"]

log = logging.getLogger("spotbatch.worker")

_POLL_IDLE_MS = 100  # FACTS: poll(0) with every partition paused spins a core
_POLL_HUNGRY_MS = 20  # the model is about to run dry: stage more batches soon
_POLL_BUSY_MS = 50  # batches are staged; longer turns leave the GIL to inference
_BURST_DONE = "burst: caught up"  # a planned stop, not an interruption
_FINAL_RESERVE_S = 3.0  # of the drain deadline, kept for commit + flush + leave
_MAX_OPEN_INPUTS = 4  # URI jobs being read at once; a partition waits at the next one


@dataclass
class _Load:
    """A job on the I/O pool: its file being read, or its output looked for."""

    record: Any
    epoch: int
    job: Job
    rows: int  # what it will add to the backlog (a guess for a file not read yet)
    future: Future


@dataclass(eq=False)
class _Feed:
    """A URI job whose parts are read as the backlog has room; ``read``: the one in flight."""

    feed: PartFeed
    read: Future | None = None
    rows: int = 0  # rows the read in flight brings

    @property
    def tp(self) -> TopicPartition:
        record = self.feed.parent.record
        return TopicPartition(record.topic, record.partition)


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
        limits = InputLimits(max_line_bytes=settings.max_line_bytes, max_document_bytes=settings.max_document_bytes,
                             read_timeout_s=settings.input_read_timeout_s)
        self._intake = Intake(handler, sink, planner, aliases=(settings.model,),
                              inputs=InputPolicy(settings.input_prefixes), limits=limits)
        self._live: set[PendingJob] = set()  # accepted units not yet durable or failed
        self._skip_models = set(settings.skip_models) - {settings.model, handler.name}
        ledger_root = join_uri(settings.checkpoint_location(), "_attempts")
        self._ledger = AttemptLedger(store_for(ledger_root), ledger_root, self.worker_id, settings.max_attempts)
        self._stop_reason = "stop requested"
        self._sink = sink
        # Stage as many closed batches as the backlog allows: a fast model (GPU) must not
        # wait for the owner's next turn between batches.
        staged = max(2, settings.max_pending_rows // settings.max_batch_rows)
        self._inference = InferenceThread(model_retry(run_batch), max_in_flight=staged)
        # Reads, output lookups (one per job: a HEAD on S3) and writes; lookups are short.
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="io")
        self._admission = Admission(self._ledger, self._io, max_batch_rows=settings.max_batch_rows)
        self._loads: list[_Load] = []
        self._feeds: list[_Feed] = []  # URI jobs with parts still to read, oldest first
        self._waiting_for_inputs: set[TopicPartition] = set()  # paused at a URI job: _MAX_OPEN_INPUTS
        self._writes: list[tuple[PendingJob, float, Future]] = []
        # (record, epoch, kafka futures): a job's offset is done once its DLQ entry and
        # status record are acknowledged, so a crash after the commit cannot drop them.
        self._acks: list[tuple[Any, int, list]] = []
        self._idle_since: float | None = None
        self._hold_until = 0.0  # monotonic; see avoid_large_jobs
        self._held: set[TopicPartition] = set()  # partitions waiting at a held-back large job
        self._rows_per_job = float(settings.max_batch_rows)  # learned; starts cautious
        self._consumer = self._make_consumer()
        # A broker blip (connection lost, coordinator moving) must not end the worker.
        self._poll = kafka_retry(self._consumer.poll)
        self._streams = SideStreams(self._make_producer(), self.worker_id,
                                    max_record_bytes=settings.max_partition_fetch_bytes, archive=self._archive)
        self._usage = UsageMeter(worker_id=self.worker_id, pool=settings.pool, instance_type=settings.instance_type,
                                 gpus=settings.gpu_count, interval_s=settings.usage_interval_s,
                                 emit=lambda record: self._streams.usage(settings.usage_topic, **record))

    # ---- lifecycle -------------------------------------------------------------

    def request_stop(self, *, now: bool = False, within_s: float | None = None, reason: str = "stop requested") -> None:
        """Begin draining (signal- and thread-safe). ``now`` abandons in-flight work at once.

        ``within_s``: the time a spot notice leaves; the drain deadline is the sooner
        of it and ``drain_s``.
        """
        budget = self.settings.drain_s if within_s is None else max(0.0, min(self.settings.drain_s, within_s))
        deadline = time.monotonic() + (0.0 if now else budget)
        if self._stop_at is None:  # the first reason is the cause (a notice, then the node's SIGTERM)
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
           the next owner resumes after them. Their checkpoints note that this attempt
           ended in a drain, so it does not count toward max_attempts.
        3. Finish other accepted work: close batches without waiting for max_wait and
           keep turning until nothing is in flight, or only the final reserve is left;
           what does not fit is abandoned (at most the batches in flight).
        4. Commit what is durable. Unfinished work stays uncommitted: redelivered later.
        5. Record the stop (reason, rows lost, drain seconds) and the final usage
           record on the usage topic.
        6. Flush the side streams and close the consumer, which leaves the group.
        """
        started, deadline = time.monotonic(), self._stop_at
        self._consumer.pause(*self._consumer.assignment())
        # Queued parts of URI jobs are checkpointed and resumable: leave them at once.
        # They stay in _live, so the interruption record counts their inferred rows.
        self._batcher.drop(lambda unit: unit.parent is None)
        releases = [self._io.submit(parent.release) for parent in self._unfinished_parted_jobs()]
        releases += [self._io.submit(self._ledger.release, tp.topic, tp.partition) for tp in self._owned]
        self._drop_feeds(lambda feed: True)
        self._forget(self._admission.drop(lambda unit: False))  # suspects wait for the next owner
        while self._busy() and time.monotonic() < deadline - _FINAL_RESERVE_S:
            self._turn(draining=True)
        if self._busy():
            log.warning("drain deadline reached: abandoning %d uncommitted jobs", self._tracker.outstanding())
        _wait_quietly(releases, deadline - time.monotonic() - _FINAL_RESERVE_S / 2)
        self._commit()
        if self._stop_reason != _BURST_DONE:
            self._report_interruption(time.monotonic() - started)
        self._usage.close()  # the final usage record, flushed with the rest below
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
                if not self._accept(record):  # held back: fetched again when the hold ends
                    self._consumer.seek(tp, record.offset)
                    break
        self._collect_loads()
        self._collect_recorded()
        self._collect_parts()
        self._pull_parts()
        self._collect_results()
        self._feed_inference(force=draining)
        self._collect_writes()
        self._collect_acks()
        self._commit()
        self.metrics.tick()
        self._usage.tick()

    def _apply_rebalance_events(self) -> dict[TopicPartition, int | None]:
        """Apply the listener's news; returns the partitions assigned now and where each
        was rewound to (None: no committed offset)."""
        rewound: dict[TopicPartition, int | None] = {}
        while self._events:
            kind, tps = self._events.pop(0)
            if kind == "assigned":
                self._epoch += 1
                self._owned.update({tp: self._epoch for tp in tps})
                targets = self._rewind(tps)
                rewound.update(targets)
                self._load_ledgers(targets)
                log.info("assigned %s", sorted(tp.partition for tp in tps))
                continue
            for parent in self._unfinished_parted_jobs(in_partitions=tps):  # not the job's fault
                self._io.submit(parent.release)
            self._drop_feeds(lambda feed: feed.tp in tps)
            for tp in tps:  # revoked or lost: forget; in-flight results become stale
                self._release_ledger(tp)
                self._owned.pop(tp, None)
                self._tracker.forget(tp)
            dropped = self._batcher.drop(self._is_current) + self._admission.drop(self._is_current)
            self._forget(dropped)
            if tps:
                log.info("%s %s; abandoned %d queued jobs uncommitted", kind,
                         sorted(tp.partition for tp in tps), len(dropped))
        return rewound

    def _load_ledgers(self, committed: dict[TopicPartition, int | None]) -> None:
        """Read the attempt ledgers of newly assigned partitions before any of their jobs."""
        loads = [self._io.submit(self._ledger.load, tp.topic, tp.partition, at) for tp, at in committed.items()]
        for fut in loads:
            fut.result()  # the checkpoint store is down: an infrastructure fault

    def _release_ledger(self, tp: TopicPartition) -> None:
        """A revoke is not the jobs' fault: mark our session released, then forget it."""
        try:
            self._ledger.release(tp.topic, tp.partition)
        except Exception as exc:  # noqa: BLE001 - best effort: costs a poison check one attempt
            log.warning("could not release the attempt ledger of partition %d: %s", tp.partition, exc)
        self._ledger.forget(tp.topic, tp.partition)

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
        """Rows accepted and not yet inferred; a file not opened yet counts as one batch."""
        loading = sum(load.rows for load in self._loads) + sum(feed.rows for feed in self._feeds)
        return self._batcher.pending_rows + self._inference.rows_in_flight + loading + self._admission.rows

    def _room_in_records(self) -> int:
        """Records one poll may return without overshooting max_pending_rows by much."""
        room_rows = self.settings.max_pending_rows - self._backlog_rows()
        return max(1, min(500, int(room_rows / self._rows_per_job)))

    def _flow_control(self, draining: bool) -> None:
        # Re-applied every turn: newly assigned partitions start unpaused (FACTS).
        assigned = self._consumer.assignment()
        if self._held and time.monotonic() >= self._hold_until:
            log.info("rebalance hold over: resuming %d held partitions", len(self._held))
            self._held.clear()
        self._held &= assigned
        if self._open_inputs() < _MAX_OPEN_INPUTS:
            self._waiting_for_inputs.clear()
        waiting = (self._held | self._waiting_for_inputs) & assigned
        if draining or self._backlog_rows() >= self.settings.max_pending_rows:
            self._consumer.pause(*assigned)
        else:
            self._consumer.pause(*waiting)
            if resumable := self._consumer.paused() - waiting:
                self._consumer.resume(*resumable)
        self.metrics.pending_rows.set(self._batcher.pending_rows)

    def _poll_ms(self) -> int:
        if self._inference.in_flight and self._inference.hungry and len(self._batcher):
            return _POLL_HUNGRY_MS
        if (self._inference.in_flight or self._loads or self._writes or len(self._admission)
                or any(f.read for f in self._feeds)):
            return _POLL_BUSY_MS
        due = self._batcher.seconds_until_due()
        return _POLL_IDLE_MS if due is None else max(1, min(_POLL_IDLE_MS, int(due * 1000)))

    def _accept(self, record: Any) -> bool:
        """Take a record on; False when it is held back (a large job after a rebalance
        recommendation) and its partition must stop here."""
        tp = TopicPartition(record.topic, record.partition)
        epoch = self._owned.get(tp)
        if epoch is None:  # fetched just before a revoke: not ours to process any more
            return True
        try:
            job = parse_job(record.value)
        except Exception as exc:  # noqa: BLE001 - the one boundary: whatever a message holds
            self._tracker.seen(tp, record.offset)
            self._dead_letter(record, epoch, job_error_from(exc))
            return True
        if self._hold_large_jobs(tp, job) or self._no_room_for_input(tp, job):
            return False
        self._tracker.seen(tp, record.offset)
        if job.model in self._skip_models:  # another fleet's, read by its own group: not ours to touch
            self._tracker.done(tp, record.offset)
            return True
        try:
            self._intake.check(job)  # fail fast on model, params and prefix before any I/O
        except Exception as exc:  # noqa: BLE001 - see parse_job above
            self._dead_letter(record, epoch, job_error_from(exc))
            return True
        if isinstance(job.inputs, InlineInputs) and not self._ledger.ever_taken(tp.topic, tp.partition, record.offset):
            self._build_fresh(record, epoch, job)  # the usual case: no I/O, so no trip to the pool
            return True
        rows = len(job.inputs.rows) if isinstance(job.inputs, InlineInputs) else self.settings.max_batch_rows
        self._loads.append(_Load(record, epoch, job, rows, self._io.submit(self._intake.build, job, record, epoch)))
        return True

    def _build_fresh(self, record: Any, epoch: int, job: Job) -> None:
        """An inline job no owner took up before: no output of it can exist to look for."""
        try:
            units = self._intake.build(job, record, epoch, lookup=False)
        except Exception as exc:  # noqa: BLE001 - see parse_job above
            self._dead_letter(record, epoch, job_error_from(exc))
            return
        self._add(record, epoch, job, units)

    def avoid_large_jobs(self, for_s: float) -> None:
        """A rebalance recommendation: this instance is at elevated risk of interruption.
        For ``for_s``, a URI job reached in a partition is not started; the partition
        waits at it (paused, uncommitted), so a safer owner can take it after an
        interruption, or this one once the hold ends. Checkpoints come every batch."""
        self._hold_until = time.monotonic() + for_s
        self.interval.pin_rows(self.settings.max_batch_rows)

    def _hold_large_jobs(self, tp: TopicPartition, job: Job) -> bool:
        if isinstance(job.inputs, InlineInputs) or time.monotonic() >= self._hold_until:
            return False
        if tp not in self._held:
            log.info("holding partition %d at large job %s (rebalance recommendation)", tp.partition, job.job_id)
        self._held.add(tp)
        return True

    def _open_inputs(self) -> int:
        return len(self._feeds) + sum(1 for load in self._loads if Intake.needs_io(load.job))

    def _no_room_for_input(self, tp: TopicPartition, job: Job) -> bool:
        """Each URI job holds an open input until its last part is read: a partition
        waits at the next one while _MAX_OPEN_INPUTS are open."""
        if not Intake.needs_io(job) or self._open_inputs() < _MAX_OPEN_INPUTS:
            return False
        self._waiting_for_inputs.add(tp)
        return True

    def _pull_parts(self) -> None:
        """Read URI jobs' next parts while the backlog has room, oldest job first and one
        read per job at a time: a job of any size holds a few parts in memory."""
        for feed in self._feeds:
            if feed.read is not None or feed.feed.parent.failed or not feed.feed.parts_left:
                continue
            backlog, rows = self._backlog_rows(), feed.feed.next_rows
            if backlog and backlog + rows > self.settings.max_pending_rows:
                return
            feed.rows, feed.read = rows, self._io.submit(feed.feed.read_next)

    def _collect_parts(self) -> None:
        for feed in [f for f in self._feeds if f.read is not None and f.read.done()]:
            read, feed.read, feed.rows = feed.read, None, 0
            parent = feed.feed.parent
            try:
                unit = read.result()
            except Exception as exc:  # noqa: BLE001 - infrastructure faults re-raise below
                self._drop_feeds(lambda f: f is feed)
                if self._owned.get(feed.tp) == feed.feed.epoch and not parent.failed:
                    self._fail_parted(parent)
                    self._dead_letter(parent.record, feed.feed.epoch, job_error_from(exc, default="input_invalid"),
                                      parent.job.job_id)
                continue
            if not feed.feed.parts_left or parent.failed:
                self._drop_feeds(lambda f: f is feed)
            if self._is_current(unit) and not _failed(unit):
                self._live.add(unit)
                self._batcher.add(unit)

    def _fail_parted(self, parent) -> None:
        parent.failed = True
        self._io.submit(parent.discard)

    def _drop_feeds(self, which) -> None:
        """Stop reading these jobs' inputs (closed on the I/O pool: a read may be running)."""
        dropped = [feed for feed in self._feeds if which(feed)]
        self._feeds = [feed for feed in self._feeds if feed not in dropped]
        for feed in dropped:
            self._io.submit(feed.feed.close)

    def _collect_loads(self) -> None:
        for load in _take_done(self._loads, lambda item: item.future):
            try:
                units = load.future.result()
            except Exception as exc:  # noqa: BLE001 - infrastructure faults re-raise below
                self._dead_letter(load.record, load.epoch, job_error_from(exc, default="input_invalid"))
                continue
            if self._owned.get(TopicPartition(load.record.topic, load.record.partition)) == load.epoch:
                self._add(load.record, load.epoch, load.job, units)

    def _add(self, record: Any, epoch: int, job: Job, units: list[PendingJob] | PartFeed) -> None:
        if not units:  # a previous owner made it durable but did not commit: report, commit
            log.info("job %s already complete (output found); committing", job.job_id)
            rows = {"rows": len(job.inputs.rows)} if isinstance(job.inputs, InlineInputs) else {}
            self._report_ok(record, epoch, job.job_id, output=self._intake.output_of(job), already_done=True, **rows)
            return
        # A running mean of rows per job sizes the next poll (see _room_in_records).
        rows = units.parent.rows if isinstance(units, PartFeed) else sum(u.rows for u in units)
        self._rows_per_job += (rows - self._rows_per_job) * 0.1
        if isinstance(units, PartFeed):
            self._start_feed(units)
            return
        for unit in units:
            try:
                self._admission.admit(unit)
            except JobError as err:
                self._dead_letter(record, epoch, err, job.job_id)
                continue
            self._live.add(unit)

    def _collect_recorded(self) -> None:
        """Inline units whose attempt is recorded go to the batcher."""
        self._admission.record(committed=self._tracker.position)
        for unit in self._admission.recorded():
            if self._is_current(unit) and not _failed(unit):
                self._batcher.add(unit)
            else:
                self._live.discard(unit)

    def _start_feed(self, feed: PartFeed) -> None:
        parted = feed.parent
        if self._stop_at is not None:  # draining: leave it, like the queued parts, to the next owner
            self._io.submit(parted.release)
            self._io.submit(feed.close)
            return
        part_rows = parted.progress.part_rows or parted.bounds(0)[1]
        self.metrics.part_rows.set(part_rows)
        tau = self.interval.interval_s()  # the checkpoint interval this job runs with
        log.info("job %s: %d parts to do of %d, %d rows each (checkpoint interval %s%s)", parted.job.job_id,
                 feed.parts_left, parted.progress.parts_total, part_rows, self.settings.checkpoint_interval,
                 f" = {tau:.0f}s" if tau else "")
        self._feeds.append(_Feed(feed))

    def _feed_inference(self, force: bool) -> None:
        if self._admission.isolating:  # a suspect: alone on the model (see attempts.py)
            while self._inference.can_take():
                batch = self._admission.next_suspect_batch(model_idle=not self._inference.in_flight,
                                                           done=lambda unit: unit not in self._live)
                if batch is None:
                    return
                self._inference.submit(batch)
            return
        while self._inference.can_take() and self._may_risk_another_batch():
            batch = self._batcher.next_batch(force=force)
            if batch is None:
                return
            self._inference.submit(batch)

    def _may_risk_another_batch(self) -> bool:
        """Keep what a SIGKILL can cost within one checkpoint interval (DESIGN invariant 3).

        Rows inferred, or being inferred, whose unit is not durable yet die with the
        process. Holding back a batch only helps while a write or an inference is on its
        way; with neither, a unit larger than the interval must go on to finish at all.
        """
        if not (self._writes or self._inference.in_flight):
            return True
        at_risk = self._inference.rows_in_flight + sum(unit.rows_inferred for unit in self._live)
        limit = max(self.interval.rows(self._rows_per_s), self.settings.max_batch_rows)
        return at_risk + self.settings.max_batch_rows <= limit

    def _collect_results(self) -> None:
        inline = []  # completed inline jobs: written together, one sync for all
        for result in self._inference.results():
            self._account(result)
            for seg, outputs in result.parts:
                job = seg.job
                if not self._is_current(job) or _failed(job):
                    self._live.discard(job)
                    continue
                job.add_part(seg.start, outputs)
                if job.complete and job.parent is None:
                    inline.append(job)
                elif job.complete:
                    self._writes.append((job, time.monotonic(), self._io.submit(self._write_part, job)))
            for job, err in result.failures:
                if self._is_current(job) and not _failed(job):
                    job.failed = True
                    if job.parent is not None:
                        self._fail_parted(job.parent)
                    self._dead_letter(job.record, job.epoch, err, job.job.job_id)
                self._live.discard(job)
        if inline:
            written = self._io.submit(self._write_inline, inline)
            self._writes += [(job, time.monotonic(), written) for job in inline]

    def _write_inline(self, jobs: list[PendingJob]) -> bool:
        """Make inline jobs durable together (I/O thread). Their outputs are their
        checkpoints, so the group's cost sizes the checkpoint interval too."""
        started = time.monotonic()
        self._sink.write_many([(job.output_uri, job.ids, job.outputs()) for job in jobs])
        self.interval.observe_cost(time.monotonic() - started)
        for _ in jobs:
            chaos.reached("after_write")
        return True

    def _write_part(self, job: PendingJob) -> bool:
        """Make a part durable and checkpoint it (I/O thread); True once its job is complete."""
        self._sink.write(job.output_uri, job.ids, job.outputs())
        complete, cost_s = job.parent.part_done(job.part, job.rows)
        self.interval.observe_cost(cost_s)
        chaos.reached("after_write")
        return complete

    def _archive(self, name: str, data: bytes) -> str:
        """Store an oversized dead letter's original value beside the outputs."""
        uri = self._sink.under_root(f"_dlq/{name}")
        self._sink.write_bytes(uri, data)
        return uri

    def _collect_writes(self) -> None:
        for job, _, fut in _take_done(self._writes, lambda item: item[2]):
            self._live.discard(job)
            complete = fut.result()  # an infrastructure fault raises and stops the worker
            if not complete:  # a part of a URI job: checkpointed, the job goes on
                self.metrics.parts.inc()
                continue
            self.stats.jobs_ok += 1
            self._usage.add_job()
            self.metrics.jobs.labels("ok").inc()
            whole = job.parent
            started = whole.started_at if whole else job.accepted_at
            self._report_ok(job.record, job.epoch, job.job.job_id, rows=whole.rows if whole else job.rows,
                            seconds=round(time.monotonic() - started, 3),
                            output=whole.folder_uri if whole else job.output_uri)

    def _report_ok(self, record: Any, epoch: int, job_id: str, **fields: Any) -> None:
        """The ok status; the job's offset is done once the broker has it."""
        status = self._streams.status(record.topic, job_id, status="ok", key=record.key, source=_coords(record),
                                      **fields)
        self._acks.append((record, epoch, [status]))

    def _dead_letter(self, record: Any, epoch: int, err: JobError, job_id: str | None = None) -> None:
        job_id = job_id or _job_id_of(record)
        log.warning("dead-letter %s partition=%d offset=%d: %s", job_id or "<unparsed>", record.partition, record.offset, err)
        self.stats.jobs_failed += 1
        self.metrics.jobs.labels("failed").inc()
        self.metrics.errors.labels(err.code).inc()
        dead = self._streams.dead_letter(record, err)
        status = self._streams.status(
            record.topic, job_id, status="failed", key=record.key,
            error=err.code, reason=err.reason, source=_coords(record),
        )
        self._acks.append((record, epoch, [dead, status]))

    def _collect_acks(self) -> None:
        all_done = lambda futs: all(f.is_done for f in futs)  # noqa: E731
        for record, epoch, futs in _take_done(self._acks, lambda item: item[2], done=all_done):
            if failed := [f for f in futs if not f.succeeded()]:  # never commit past a lost record
                raise RuntimeError(f"side-stream write failed for offset {record.offset}: {failed[0].exception}")
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
        self._usage.add_busy(result.seconds, rows=result.batch.rows)

    def _should_leave(self) -> bool:
        if self.settings.leave_group != "auto":
            return self.settings.leave_group == "always"
        # Measured on Tansu (the embedded broker): a LeaveGroup while another member's
        # join is pending wedges the group for good; without it, the session timeout
        # removes us and the group moves on. Real Kafka handles the leave correctly.
        cluster_id = getattr(getattr(self._consumer, "_client", None), "cluster", None)
        return getattr(cluster_id, "cluster_id", None) != "tansu_cluster"

    def _unfinished_parted_jobs(self, in_partitions: set[TopicPartition] | None = None) -> list:
        units = [(u.parent, u.tp) for u in self._live if u.parent is not None]
        units += [(feed.feed.parent, feed.tp) for feed in self._feeds]
        parents = {id(p): p for p, tp in units if not p.failed and (in_partitions is None or tp in in_partitions)}
        return [p for p in parents.values() if not p.progress.complete]

    def _forget(self, units: list[PendingJob]) -> None:
        self._live.difference_update(units)

    def _report_interruption(self, drain_s: float) -> None:
        """One usage record per stop: what the interruption cost, for the cost report."""
        lost = sum(unit.rows_inferred for unit in self._live)
        self.metrics.rows_lost.inc(lost)
        self._usage.add_stop(reason=self._stop_reason, rows_recomputed=lost)
        self._streams.usage(self.settings.usage_topic, kind="interruption", reason=self._stop_reason,
                            drain_s=round(drain_s, 3), rows_lost=lost, units_abandoned=len(self._live),
                            rows=self.stats.rows, jobs_ok=self.stats.jobs_ok, jobs_failed=self.stats.jobs_failed)
        log.info("interruption (%s): drained in %.1fs, %d inferred rows lost", self._stop_reason, drain_s, lost)

    def _is_current(self, job: PendingJob) -> bool:
        return self._owned.get(job.tp) == job.epoch

    def _busy(self) -> bool:
        return bool(len(self._batcher) or self._inference.in_flight or self._loads or self._feeds or self._writes
                    or self._acks or len(self._admission))

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
            **client_options(s),
        )

    def _make_producer(self) -> KafkaProducer:
        return KafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            client_id=f"{self.worker_id}-side",
            acks="all",
            linger_ms=5,
            max_request_size=self.settings.max_partition_fetch_bytes,
            **client_options(self.settings),
        )


def _take_done(items: list, future_of, done=lambda f: f.done()) -> list:
    """Remove and return the items whose future has finished, keeping order."""
    flags = [done(future_of(item)) for item in items]  # read once: futures finish concurrently
    finished = [item for item, flag in zip(items, flags) if flag]
    if finished:
        items[:] = [item for item, flag in zip(items, flags) if not flag]
    return finished


def _wait_quietly(futures: list[Future], timeout_s: float) -> None:
    """Best effort within the drain: a release that fails or is late costs nothing but
    one attempt counted against the job."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    for fut in futures:
        try:
            fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - logged; the drain goes on
            log.warning("could not note the drain in a checkpoint: %s", exc)


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
