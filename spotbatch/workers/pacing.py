"""Pacing: how much the owner fetches, which partitions wait, and how long a poll blocks.

The backlog (rows accepted and not yet inferred) is held near ``max_pending_rows``: at
it, every partition is paused; below it, only the partitions that wait at a job are.
A partition waits at a URI job while ``max_open_inputs`` inputs are open (each holds a
reader until its last part is read), and at any URI job during a rebalance hold (a
safer owner should take it: see ``avoid_large_jobs``).
"""

from __future__ import annotations

import logging
import time

from kafka.structs import TopicPartition

from spotbatch.jobs import InlineInputs, Job
from spotbatch.workers.broker import JobConsumer

__all__ = ["Pacing", "POLL_IDLE_MS", "POLL_HUNGRY_MS", "POLL_BUSY_MS"]

log = logging.getLogger("spotbatch.worker")

POLL_IDLE_MS = 100  # FACTS: poll(0) with every partition paused spins a core
POLL_HUNGRY_MS = 20  # the model is about to run dry: stage more batches soon
POLL_BUSY_MS = 50  # batches are staged; longer turns leave the GIL to inference
_MAX_RECORDS = 500  # per poll, whatever the room


class Pacing:
    def __init__(self, *, max_pending_rows: int, max_batch_rows: int, max_open_inputs: int = 4) -> None:
        self.max_pending_rows = max_pending_rows
        self.max_open_inputs = max_open_inputs
        self._rows_per_job = float(max_batch_rows)  # learned; starts cautious
        self._hold_until = 0.0  # monotonic; see avoid_large_jobs
        self._held: set[TopicPartition] = set()  # waiting at a held-back large job
        self._waiting_for_inputs: set[TopicPartition] = set()  # waiting at a URI job: inputs full

    def learn_job_rows(self, rows: int) -> None:
        """A running mean of rows per job sizes the next poll (see room_in_records)."""
        self._rows_per_job += (rows - self._rows_per_job) * 0.1

    def room_in_records(self, backlog_rows: int) -> int:
        """Records one poll may return without overshooting max_pending_rows by much."""
        room_rows = self.max_pending_rows - backlog_rows
        return max(1, min(_MAX_RECORDS, int(room_rows / self._rows_per_job)))

    def full(self, backlog_rows: int) -> bool:
        return backlog_rows >= self.max_pending_rows

    def avoid_large_jobs(self, for_s: float) -> None:
        """For ``for_s``, a URI job reached in a partition is not started (see hold)."""
        self._hold_until = time.monotonic() + for_s

    def hold(self, tp: TopicPartition, job: Job) -> bool:
        """True when ``job`` must wait: a URI job during a rebalance hold."""
        if isinstance(job.inputs, InlineInputs) or time.monotonic() >= self._hold_until:
            return False
        if tp not in self._held:
            log.info("holding partition %d at large job %s (rebalance recommendation)", tp.partition, job.job_id)
        self._held.add(tp)
        return True

    def no_room_for_input(self, tp: TopicPartition, needs_io: bool, open_inputs: int) -> bool:
        """True when a job that opens an input must wait for one to close."""
        if not needs_io or open_inputs < self.max_open_inputs:
            return False
        self._waiting_for_inputs.add(tp)
        return True

    def apply(self, consumer: JobConsumer, *, backlog_rows: int, open_inputs: int, draining: bool) -> None:
        """Pause and resume partitions. Re-applied every turn: newly assigned partitions
        start unpaused (FACTS)."""
        assigned = consumer.assignment()
        if self._held and time.monotonic() >= self._hold_until:
            log.info("rebalance hold over: resuming %d held partitions", len(self._held))
            self._held.clear()
        self._held &= assigned
        if open_inputs < self.max_open_inputs:
            self._waiting_for_inputs.clear()
        waiting = (self._held | self._waiting_for_inputs) & assigned
        if draining or self.full(backlog_rows):
            consumer.pause(*assigned)
            return
        consumer.pause(*waiting)
        if resumable := consumer.paused() - waiting:
            consumer.resume(*resumable)

    @staticmethod
    def poll_ms(*, hungry: bool, busy: bool, due_s: float | None, dry_s: float | None = None) -> int:
        """``hungry``: the model runs dry soon and closed batches wait; ``busy``: work is
        on its way back (inference, reads, writes); ``due_s``: until the next batch closes;
        ``dry_s``: until the model finishes what it holds (rows in flight / its rows/s).

        A poll does not return early when a result comes back, so a busy owner wakes by
        half the time the model has left: a fast model (tiny, a GPU) eats the backlog in
        tens of milliseconds, and a fixed 50 ms sleep would starve it."""
        if hungry:
            wait = POLL_HUNGRY_MS
        elif busy:
            wait = POLL_BUSY_MS
        else:
            return POLL_IDLE_MS if due_s is None else max(1, min(POLL_IDLE_MS, int(due_s * 1000)))
        return wait if dry_s is None else max(1, min(wait, int(dry_s * 500)))
