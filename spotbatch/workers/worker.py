"""The worker: consume -> batch -> infer -> write -> commit.

Threads (dramatiq's split): this module's owner thread is the only one that touches
the Kafka consumer. The inference thread runs the model; a small I/O pool reads
input files and writes outputs. Completed work flows back to the owner, which
commits. An offset is committed only once its job is durable: its Parquet file
written, or its dead letter acknowledged by the broker.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from spotbatch import chaos
from spotbatch.config import Settings
from spotbatch.errors import JobError, job_error_from
from spotbatch.input_access import InputPolicy
from spotbatch.inputs import InputLimits
from spotbatch.jobs import InlineInputs, Job, parse_job
from spotbatch.checkpointing import CheckpointInterval, CheckpointStore, store_for_checkpoints
from spotbatch.storage import join_uri, store_for
from spotbatch.workers.admission import Admission
from spotbatch.workers.attempts import AttemptLedger
from spotbatch.workers.batcher import Batcher, PendingJob
from spotbatch.workers.broker import Broker, KafkaBroker, Rebalance
from spotbatch.workers.deadline import Deadline
from spotbatch.workers.feeds import Feeds
from spotbatch.workers.inference import BatchResult, InferenceThread
from spotbatch.workers.inflight import InFlight, State
from spotbatch.workers.intake import Intake
from spotbatch.workers.metrics import WorkerMetrics
from spotbatch.workers.offsets import OffsetTracker
from spotbatch.workers.outcomes import Outcomes
from spotbatch.workers.ownership import Ownership
from spotbatch.workers.pacing import Pacing
from spotbatch.workers.parts import PartFeed, PartPlanner
from spotbatch.workers.streams import SideStreams
from spotbatch.workers.shadow import shadow_record
from spotbatch.workers.usage import UsageMeter
from spotbatch.workers.versions import LoadedModel, Versions

__all__ = ["Worker", "WorkerStats"]

log = logging.getLogger("spotbatch.worker")

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


@dataclass
class WorkerStats:
    jobs_ok: int = 0
    jobs_failed: int = 0
    rows: int = 0


class Worker:
    """Sequences the loop; each concern lives in its own part (see the module list).

    ``broker`` makes the consumer and the producer (kafka-python by default;
    ``spotbatch.testing.MemoryBroker`` in unit tests). ``stage`` (``BatchRunner.stage``)
    does a batch's host work and upload one batch ahead of ``run_batch``. ``versions``
    (a registry name's champion and challenger, see versions.py) replaces the one model
    ``handler`` / ``run_batch`` / ``stage`` describe.
    """

    def __init__(self, settings: Settings, handler: Any, run_batch: Any, sink: Any, *, burst: bool = False,
                 checkpoints: CheckpointStore | None = None, broker: Broker | None = None,
                 stage: Callable[[Any], Any] | None = None, versions: Versions | None = None) -> None:
        self._versions = versions or Versions.single(handler.name, LoadedModel(handler, run_batch, stage),
                                                     aliases=(settings.model,))
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = WorkerMetrics()
        self.stats = WorkerStats()
        self._burst = burst
        self._stop_at: Deadline | None = None  # the shared drain deadline once stopping
        self._stop_reason = "stop requested"
        self._owned = Ownership()
        self._tracker = OffsetTracker()
        self._batcher = _batcher_for(settings, self._versions)
        self._max_pending_rows = _pending_limit(settings)
        self._pacing = Pacing(max_pending_rows=self._max_pending_rows, max_batch_rows=settings.max_batch_rows,
                              max_open_inputs=_MAX_OPEN_INPUTS)
        self.interval = CheckpointInterval(settings.checkpoint_interval, batch_rows=settings.max_batch_rows,
                                           mtbi_s=settings.mtbi_s)
        self._rows_per_s: float | None = None  # EWMA of inference throughput, sizes parts
        planner = PartPlanner(checkpoints or store_for_checkpoints(settings.checkpoint_location()), sink,
                              self.interval, owner=self.worker_id, max_attempts=settings.max_attempts,
                              rows_per_s=lambda: self._rows_per_s)
        limits = InputLimits(max_line_bytes=settings.max_line_bytes, max_document_bytes=settings.max_document_bytes,
                             read_timeout_s=settings.input_read_timeout_s)
        self._intake = Intake(self._versions, sink, planner,
                              inputs=InputPolicy(settings.input_prefixes), limits=limits)
        self._inflight = InFlight()  # accepted units not yet durable or failed, by state
        self._skip_models = set(settings.skip_models) - self._versions.names()
        ledger_root = join_uri(settings.checkpoint_location(), "_attempts")
        self._ledger = AttemptLedger(store_for(ledger_root), ledger_root, self.worker_id, settings.max_attempts)
        self._sink = sink
        # Stage as many closed batches as the backlog allows: a fast model (GPU) must not
        # wait for the owner's next turn between batches.
        staged = max(2, self._max_pending_rows // settings.max_batch_rows)
        versions = self._versions
        stages = versions.model_for(None).stage is not None  # text models: a stage thread
        self._inference = InferenceThread(None, max_in_flight=staged, run_for=lambda b: versions.run_for(b.served),
                                          stage_for=(lambda b: versions.model_for(b.served).stage) if stages else None)
        # Reads, output lookups (one per job: a HEAD on S3) and writes; lookups are short.
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="io")
        self._admission = Admission(self._ledger, self._io, max_batch_rows=settings.max_batch_rows)
        self._loads: list[_Load] = []
        self._feeds = Feeds(self._io, max_pending_rows=self._max_pending_rows)  # URI jobs with parts to read
        self._idle_since: float | None = None
        broker = broker or KafkaBroker()
        self._consumer = broker.consumer(settings, self.worker_id)
        self._streams = SideStreams(broker.producer(settings, self.worker_id), self.worker_id,
                                    max_record_bytes=settings.max_partition_fetch_bytes, archive=self._archive)
        self._usage = UsageMeter(worker_id=self.worker_id, pool=settings.pool, instance_type=settings.instance_type,
                                 gpus=settings.gpu_count, interval_s=settings.usage_interval_s,
                                 emit=lambda record: self._streams.usage(settings.usage_topic, **record))
        self._outcomes = Outcomes(self._streams, self._tracker, self._owned.epoch_of, self.metrics, self.stats,
                                  self._usage, after_commit=lambda: chaos.reached("after_commit"))

    # ---- lifecycle -------------------------------------------------------------

    def request_stop(self, *, now: bool = False, within_s: float | None = None, reason: str = "stop requested") -> None:
        """Begin draining (signal- and thread-safe). ``now`` abandons in-flight work at once.

        ``within_s``: the time a spot notice leaves; the drain deadline is the sooner
        of it and ``drain_s``.
        """
        budget = self.settings.drain_s if within_s is None else max(0.0, min(self.settings.drain_s, within_s))
        deadline = Deadline.within(0.0 if now else budget)
        if self._stop_at is None:  # the first reason is the cause (a notice, then the node's SIGTERM)
            self._stop_reason = reason
        self._stop_at = deadline.sooner(self._stop_at)

    def start(self) -> None:
        """Join the group (run() does it; unit tests call it, then step turn())."""
        self._consumer.subscribe(self.settings.topic)
        log.info("worker %s consuming topic=%s group=%s", self.worker_id, self.settings.topic, self.settings.group)

    def run(self) -> WorkerStats:
        self.start()
        try:
            try:
                while self._stop_at is None:
                    self.turn()
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
        started, deadline = time.monotonic(), self._stop_at or Deadline.within(0.0)
        self._consumer.pause(*self._consumer.assignment())
        # Queued parts of URI jobs are checkpointed and resumable: leave them at once.
        # Parked, they still count toward the rows the interruption record says it lost.
        self._inflight.park(lambda unit: unit.parent is not None)
        self._batcher.drop(lambda unit: unit.parent is None and unit.shadow_of is None)
        releases = [self._io.submit(parent.release) for parent in self._unfinished_parted_jobs()]
        releases += [self._io.submit(self._ledger.release, tp.topic, tp.partition) for tp in self._owned.partitions]
        self._feeds.drop(lambda feed: True)
        self._forget(self._admission.drop(lambda unit: False))  # suspects wait for the next owner
        while self._busy() and not deadline.passed(_FINAL_RESERVE_S):
            self.turn(draining=True)
        if self._busy():
            log.warning("drain deadline reached: abandoning %d uncommitted jobs", self._tracker.outstanding())
        _wait_quietly(releases, deadline.left(_FINAL_RESERVE_S / 2))
        self._commit()
        if self._stop_reason != _BURST_DONE:
            self._report_interruption(time.monotonic() - started)
        self._usage.close()  # the final usage record, flushed with the rest below
        try:  # statuses and usage records are best effort; the drain must still end
            self._streams.flush(timeout_s=max(0.5, deadline.left()))
        except KafkaError as exc:
            log.warning("side streams not fully flushed before leaving: %s", exc)
        self._consumer.close()
        log.info("worker %s left the group after %.1fs: %s", self.worker_id, time.monotonic() - started, self.stats)

    # ---- one turn of the owner loop -------------------------------------------

    def turn(self, draining: bool = False) -> None:
        """One pass of the owner loop (run() repeats it; unit tests step it)."""
        self._versions.refresh()  # a registry change: load a new champion or challenger
        self._pacing.apply(self._consumer, backlog_rows=self._backlog_rows(), open_inputs=self._open_inputs(),
                           draining=draining)
        self.metrics.pending_rows.set(self._batcher.pending_rows)
        polled = self._consumer.poll(self._poll_ms(), self._pacing.room_in_records(self._backlog_rows()))
        for event in polled.events:
            self._rebalanced(event)
        for tp, recs in polled.records.items():
            for record in recs:
                if not self._accept(record):  # held back: fetched again when the hold ends
                    self._consumer.seek(tp, record.offset)
                    break
        self._collect_loads()
        self._collect_recorded()
        self._collect_parts()
        self._feeds.pull(self._backlog_rows)
        self._collect_results()
        self._feed_inference(force=draining)
        self._collect_writes()
        self._outcomes.collect_acks()
        self._commit()
        self.metrics.tick()
        self._usage.tick()

    def _rebalanced(self, event: Rebalance) -> None:
        """Apply one rebalance before any record fetched after it."""
        tps = set(event.partitions)
        if event.kind == "assigned":
            self._owned.take(tps)
            self._load_ledgers(event.committed)
            log.info("assigned %s", sorted(tp.partition for tp in tps))
            return
        for parent in self._unfinished_parted_jobs(in_partitions=tps):  # not the job's fault
            self._io.submit(parent.release)
        self._feeds.drop(lambda feed: feed.tp in tps)
        for tp in tps:  # revoked or lost: forget; in-flight results become stale
            self._release_ledger(tp)
            self._tracker.forget(tp)
        self._owned.give_up(tps)
        dropped = self._batcher.drop(self._owned.is_current) + self._admission.drop(self._owned.is_current)
        self._forget(dropped)
        log.info("%s %s; abandoned %d queued jobs uncommitted", event.kind, sorted(tp.partition for tp in tps),
                 len(dropped))

    def _load_ledgers(self, committed) -> None:
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

    def _backlog_rows(self) -> int:
        """Rows accepted and not yet inferred; a file not opened yet counts as one batch."""
        loading = sum(load.rows for load in self._loads) + self._feeds.rows
        return self._batcher.pending_rows + self._inference.rows_in_flight + loading + self._admission.rows

    def _poll_ms(self) -> int:
        in_flight = self._inference.in_flight
        busy = bool(in_flight or self._loads or self._inflight.writes_pending or len(self._admission)
                    or self._feeds.reading)
        rate = self._rows_per_s
        dry_s = self._inference.rows_in_flight / rate if rate and in_flight else None
        return self._pacing.poll_ms(hungry=bool(in_flight and self._inference.hungry and len(self._batcher)),
                                    busy=busy, due_s=self._batcher.seconds_until_due(), dry_s=dry_s)

    def _accept(self, record: Any) -> bool:
        """Take a record on; False when it is held back (a large job after a rebalance
        recommendation) and its partition must stop here."""
        tp = TopicPartition(record.topic, record.partition)
        epoch = self._owned.epoch_of(tp)
        if epoch is None:  # fetched just before a revoke: not ours to process any more
            return True
        try:
            job = parse_job(record.value)
        except Exception as exc:  # noqa: BLE001 - the one boundary: whatever a message holds
            self._tracker.seen(tp, record.offset)
            self._outcomes.dead_letter(record, epoch, job_error_from(exc))
            return True
        if self._pacing.hold(tp, job) or self._pacing.no_room_for_input(tp, Intake.needs_io(job),
                                                                        self._open_inputs()):
            return False
        self._tracker.seen(tp, record.offset)
        if job.model in self._skip_models:  # another fleet's, read by its own group: not ours to touch
            self._tracker.done(tp, record.offset)
            return True
        try:
            self._intake.check(job)  # fail fast on model, params and prefix before any I/O
        except Exception as exc:  # noqa: BLE001 - see parse_job above
            self._outcomes.dead_letter(record, epoch, job_error_from(exc))
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
            self._outcomes.dead_letter(record, epoch, job_error_from(exc))
            return
        self._add(record, epoch, job, units)

    def avoid_large_jobs(self, for_s: float) -> None:
        """A rebalance recommendation: this instance is at elevated risk of interruption.
        For ``for_s``, a URI job reached in a partition is not started; the partition
        waits at it (paused, uncommitted), so a safer owner can take it after an
        interruption, or this one once the hold ends. Checkpoints come every batch."""
        self._pacing.avoid_large_jobs(for_s)
        self.interval.pin_rows(self.settings.max_batch_rows)

    def _open_inputs(self) -> int:
        return len(self._feeds) + sum(1 for load in self._loads if Intake.needs_io(load.job))

    def _collect_parts(self) -> None:
        for feed, read in self._feeds.finished():
            parent = feed.feed.parent
            try:
                unit = read.result()
            except Exception as exc:  # noqa: BLE001 - infrastructure faults re-raise below
                self._feeds.remove(feed)
                if self._owned.epoch_of(feed.tp) == feed.feed.epoch and not parent.failed:
                    self._fail_parted(parent)
                    self._outcomes.dead_letter(parent.record, feed.feed.epoch, job_error_from(exc, default="input_invalid"),
                                      parent.job.job_id)
                continue
            if not feed.feed.parts_left or parent.failed:
                self._feeds.remove(feed)
            if self._owned.is_current(unit) and not _failed(unit):
                self._inflight.enter(unit, State.QUEUED)
                self._batcher.add(unit)

    def _fail_parted(self, parent) -> None:
        parent.failed = True
        self._io.submit(parent.discard)

    def _collect_loads(self) -> None:
        for load in _take_done(self._loads, lambda item: item.future):
            try:
                units = load.future.result()
            except Exception as exc:  # noqa: BLE001 - infrastructure faults re-raise below
                self._outcomes.dead_letter(load.record, load.epoch, job_error_from(exc, default="input_invalid"))
                continue
            if self._owned.epoch_of(TopicPartition(load.record.topic, load.record.partition)) == load.epoch:
                self._add(load.record, load.epoch, load.job, units)

    def _add(self, record: Any, epoch: int, job: Job, units: list[PendingJob] | PartFeed) -> None:
        if not units:  # a previous owner made it durable but did not commit: report, commit
            log.info("job %s already complete (output found); committing", job.job_id)
            rows = {"rows": len(job.inputs.rows)} if isinstance(job.inputs, InlineInputs) else {}
            self._outcomes.ok(record, epoch, job.job_id, output=self._intake.output_of(job), already_done=True,
                              **rows)
            return
        self._pacing.learn_job_rows(units.parent.rows if isinstance(units, PartFeed) else sum(u.rows for u in units))
        if isinstance(units, PartFeed):
            self._start_feed(units)
            return
        for unit in units:
            try:
                self._admission.admit(unit)
            except JobError as err:
                self._outcomes.dead_letter(record, epoch, err, job.job_id)
                continue
            self._inflight.enter(unit)

    def _collect_recorded(self) -> None:
        """Inline units whose attempt is recorded go to the batcher."""
        self._admission.record(committed=self._tracker.position)
        for unit in self._admission.recorded():
            if self._owned.is_current(unit) and not _failed(unit):
                self._inflight.move(unit, State.QUEUED)
                self._batcher.add(unit)
                if unit.shadow is not None:  # extra work on the challenger: not ledgered, never written
                    self._batcher.add(unit.shadow)
            else:
                self._inflight.leave(unit)

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
        self._feeds.add(feed)

    def _feed_inference(self, force: bool) -> None:
        if self._admission.isolating:  # a suspect: alone on the model (see attempts.py)
            while self._inference.can_take():
                batch = self._admission.next_suspect_batch(model_idle=not self._inference.in_flight,
                                                           done=lambda unit: unit not in self._inflight)
                if batch is None:
                    return
                self._submit(batch)
            return
        while self._inference.can_take() and self._may_risk_another_batch():
            batch = self._batcher.next_batch(force=force)
            if batch is None:
                return
            self._submit(batch)

    def _submit(self, batch) -> None:
        for seg in batch.segments:
            if seg.job in self._inflight:  # a stale unit's rows still run; its results are dropped
                self._inflight.move(seg.job, State.INFERRING)
        self._inference.submit(batch)

    def _may_risk_another_batch(self) -> bool:
        """Keep what a SIGKILL can cost within one checkpoint interval (DESIGN invariant 3).

        Rows inferred, or being inferred, whose unit is not durable yet die with the
        process. Holding back a batch only helps while a write or an inference is on its
        way; with neither, a unit larger than the interval must go on to finish at all.
        """
        if not (self._inflight.writes_pending or self._inference.in_flight):
            return True
        at_risk = self._inference.rows_in_flight + self._inflight.rows_at_risk
        limit = max(self.interval.rows(self._rows_per_s), self.settings.max_batch_rows)
        return at_risk + self.settings.max_batch_rows <= limit

    def _collect_results(self) -> None:
        inline = []  # completed inline jobs: written together, one sync for all
        for result in self._inference.results():
            self._account(result)
            for seg, outputs in result.parts:
                job = seg.job
                if not self._owned.is_current(job) or _failed(job):
                    self._inflight.leave(job)
                    continue
                job.add_part(seg.start, outputs)
                if job.shadow_of is not None or job.shadow is not None:
                    self._compare_when_both_done(job)
                if job.shadow_of is not None:
                    continue
                if job.complete and job.parent is None:
                    inline.append(job)
                elif job.complete:
                    self._inflight.writing(job, self._io.submit(self._write_part, job))
            for job, err in result.failures:
                if job.shadow_of is not None:  # the challenger failed where the champion ran: its own gate shows it
                    log.warning("shadow run of job %s on the challenger failed: %s", job.job.job_id, err)
                    job.shadow_of.shadow = None
                    continue
                if self._owned.is_current(job) and not _failed(job):
                    job.failed = True
                    if job.parent is not None:
                        self._fail_parted(job.parent)
                    self._outcomes.dead_letter(job.record, job.epoch, err, job.job.job_id)
                self._inflight.leave(job)
        if inline:
            written = self._io.submit(self._write_inline, inline)
            for job in inline:
                self._inflight.writing(job, written)

    def _write_inline(self, jobs: list[PendingJob]) -> bool:
        """Make inline jobs durable together (I/O thread). Their outputs are their
        checkpoints, so the group's cost sizes the checkpoint interval too."""
        started = time.monotonic()
        self._sink.write_many([(job.output_uri, job.ids, job.outputs(), _metadata(job)) for job in jobs])
        self.interval.observe_cost(time.monotonic() - started)
        for _ in jobs:
            chaos.reached("after_write")
        return True

    def _write_part(self, job: PendingJob) -> bool:
        """Make a part durable and checkpoint it (I/O thread); True once its job is complete."""
        self._sink.write(job.output_uri, job.ids, job.outputs(), _metadata(job))
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
        for job, fut in self._inflight.written():
            complete = fut.result()  # an infrastructure fault raises and stops the worker
            if not complete:  # a part of a URI job: checkpointed, the job goes on
                self.metrics.parts.inc()
                continue
            whole = job.parent
            started = whole.started_at if whole else job.accepted_at
            served = job.served.status_fields() if job.served is not None else {}
            self._outcomes.written(job.record, job.epoch, job.job.job_id, rows=whole.rows if whole else job.rows,
                                   seconds=round(time.monotonic() - started, 3),
                                   output=whole.folder_uri if whole else job.output_uri, **served)

    def _commit(self) -> None:
        self._outcomes.commit(self._consumer, self._owned.partitions)

    # ---- versions --------------------------------------------------------------

    def _compare_when_both_done(self, job: PendingJob) -> None:
        """A shadowed job and its challenger run, both inferred: send how far they agree."""
        primary = job.shadow_of or job
        shadow = primary.shadow
        if shadow is None or not (primary.complete and shadow.complete):
            return
        primary.shadow = None  # once
        try:
            record = shadow_record(primary, shadow, worker=self.worker_id)
        except ValueError as exc:  # outputs that cannot be compared: say so, never fail the job
            log.warning("job %s: champion and challenger outputs not comparable: %s", primary.job.job_id, exc)
            return
        self._streams.shadow(primary.record.topic, record)

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

    def _unfinished_parted_jobs(self, in_partitions: set[TopicPartition] | None = None) -> list:
        units = [(u.parent, u.tp) for u in self._inflight if u.parent is not None]
        units += self._feeds.parents()
        parents = {id(p): p for p, tp in units if not p.failed and (in_partitions is None or tp in in_partitions)}
        return [p for p in parents.values() if not p.progress.complete]

    def _forget(self, units: list[PendingJob]) -> None:
        self._inflight.leave_all(units)

    def _report_interruption(self, drain_s: float) -> None:
        """One usage record per stop: what the interruption cost, for the cost report."""
        lost = self._inflight.rows_at_risk
        self.metrics.rows_lost.inc(lost)
        self._usage.add_stop(reason=self._stop_reason, rows_recomputed=lost)
        self._streams.usage(self.settings.usage_topic, kind="interruption", reason=self._stop_reason,
                            drain_s=round(drain_s, 3), rows_lost=lost, units_abandoned=len(self._inflight),
                            rows=self.stats.rows, jobs_ok=self.stats.jobs_ok, jobs_failed=self.stats.jobs_failed)
        log.info("interruption (%s): drained in %.1fs, %d inferred rows lost", self._stop_reason, drain_s, lost)

    def _busy(self) -> bool:
        return bool(len(self._batcher) or self._inference.in_flight or self._loads or self._feeds
                    or self._inflight.writes_pending or self._outcomes.waiting or len(self._admission))

    def _position(self, tp: TopicPartition) -> int:
        """Our committable position; without records since assignment, the fetch position."""
        pos = self._tracker.position(tp)
        return pos if pos is not None else self._consumer.position(tp)

    def _drained_for(self, seconds: float) -> bool:
        """Burst mode: nothing in flight and every owned partition read to its end."""
        caught_up = bool(self._owned) and not self._busy() and all(
            (hw := self._consumer.highwater(tp)) is not None and self._position(tp) >= hw
            for tp in self._owned.partitions
        )
        now = time.monotonic()
        if not caught_up:
            self._idle_since = None
            return False
        self._idle_since = self._idle_since or now
        return now - self._idle_since >= seconds


def _batcher_for(settings: Settings, versions: Versions) -> Batcher:
    """Token-aware batching where the model has a prepare stage and a token budget is set.

    Each job is prepared by its own version's handler (versions may tokenise apart). The
    sorting window must fit in the backlog the pacing allows (half of it: the rest is in
    flight), or it would only ever close on max_wait."""
    def prepare(job: PendingJob) -> Any:
        step = getattr(versions.model_for(job.served).handler, "prepare", None)
        return None if step is None else step(job.values)

    text = getattr(versions.handler, "prepare", None) is not None
    prepare_fn = prepare if settings.max_batch_tokens and text else None
    window = max(settings.max_batch_rows, min(16 * settings.max_batch_rows, _pending_limit(settings) // 2))
    return Batcher(max_batch_rows=settings.max_batch_rows, max_wait_ms=settings.max_wait_ms,
                   max_batch_tokens=settings.max_batch_tokens, prepare=prepare_fn, window_rows=window)


def _pending_limit(settings: Settings) -> int:
    if settings.max_pending_rows is None:  # Settings derives it from max_batch_rows when unset
        raise ValueError("max_pending_rows was not derived: build Settings with load_settings()")
    return settings.max_pending_rows


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


def _metadata(job: PendingJob) -> dict[str, str] | None:
    return None if job.served is None else job.served.metadata()


def _failed(unit: PendingJob) -> bool:
    return unit.failed or (unit.parent is not None and unit.parent.failed)
