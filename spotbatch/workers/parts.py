"""Jobs in parts: URI jobs are cut into parts, each part checkpointed once durable.

A job's input is read one part at a time (:class:`PartFeed`), as the worker's backlog
has room, so a job of any size holds a few parts in memory, never its whole input.

Layout of a job in parts (every URI job)::

    <prefix>/<job_id>/part-00000.parquet ... part-NNNNN.parquet
    <prefix>/<job_id>/_manifest.json          written last: the job is complete

After each part's output is durable, its index goes into the job's checkpoint. A
preempted job is redelivered (its offset was never committed) and the next owner
skips the parts its checkpoint lists, so a preemption costs at most the parts in
flight: one checkpoint interval of rows per part. The part size is fixed by the first
owner and kept in the checkpoint (as parts_total), so every owner cuts alike.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from spotbatch.checkpointing import CheckpointInterval, CheckpointStore, Progress, StaleCheckpoint
from spotbatch.errors import JobError
from spotbatch.inputs import RowReader
from spotbatch.jobs import Job
from spotbatch.retry import reload_retry
from spotbatch.workers.batcher import PendingJob
from spotbatch.workers.sinks import ParquetSink

__all__ = ["PartedJob", "PartFeed", "PartPlanner", "part_bounds"]


def part_bounds(rows: int, parts_total: int, index: int, part_rows: int | None = None) -> tuple[int, int]:
    """Rows [start, stop) of part ``index``: ``part_rows`` each (so parts line up with
    batches); checkpoints without it cut ``rows`` into ``parts_total`` equal parts."""
    size = part_rows or math.ceil(rows / parts_total)
    return index * size, min(rows, (index + 1) * size)


@dataclass(eq=False)
class PartedJob:
    """One job in parts: checkpoint bookkeeping shared by its parts' PendingJobs."""

    job: Job
    record: Any
    rows: int
    progress: Progress
    store: CheckpointStore
    sink: ParquetSink
    owner: str
    started_at: float = field(default_factory=time.monotonic)
    failed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def folder_uri(self) -> str:
        return self.sink.folder_uri(self.job.job_id, self.job.output)

    @property
    def manifest_uri(self) -> str:
        return self.sink.manifest_uri(self.job.job_id, self.job.output)

    def part_uri(self, index: int) -> str:
        return self.sink.part_uri(self.job.job_id, self.job.output, index)

    def bounds(self, index: int) -> tuple[int, int]:
        return part_bounds(self.rows, self.progress.parts_total, index, self.progress.part_rows)

    def part_done(self, index: int, rows: int) -> tuple[bool, float]:
        """Checkpoint a durable part (I/O thread). Returns (job complete?, save seconds).

        Parts finish on several I/O threads: the lock keeps this worker's saves in
        order. Another worker holding the same job (a rebalance overlap) bumps the
        generation under us: reload, merge its parts with ours, and save again; both
        wrote identical part files, so the union is true.
        """
        started = time.perf_counter()
        with self._lock:
            self._save_merged(lambda: self.progress.mark_part_done(index, rows))
            complete = self.progress.complete
        if complete:
            self.sink.write_bytes(self.manifest_uri, self._manifest())
        return complete, time.perf_counter() - started

    def release(self) -> None:
        """This attempt ends in a drain, not by the job's fault: it must not count
        toward max_attempts, or a job interrupted often would look like a poison job."""
        with self._lock:
            try:
                self._save_merged(lambda: self.progress.release_attempt(self.owner))
            except StaleCheckpoint:
                pass  # still racing after reload_retry: the attempt stays counted, nothing is lost

    @reload_retry
    def _save_merged(self, change: Callable[[], None]) -> None:
        """Apply ``change`` and save; a save under us (StaleCheckpoint) merges theirs
        and is retried (reload_retry) with the change applied again (it is idempotent)."""
        change()
        try:
            self.progress = self.store.save(self.progress, expected_generation=self.progress.generation or None)
        except StaleCheckpoint:
            self._merge(self.store.load(self.job.job_id))
            raise

    def discard(self) -> None:
        """The job was dead-lettered: forget its progress, so that a fixed and
        republished job starts afresh (its part files stay, outside any manifest)."""
        self.store.delete(self.job.job_id)

    def _merge(self, theirs: Progress | None) -> None:
        if theirs is None:  # deleted under us: start the record afresh, keeping our parts
            self.progress = self.progress.model_copy(update={"generation": 0})
            return
        for i in self.progress.parts_done:
            start, stop = self.bounds(i)
            theirs.mark_part_done(i, stop - start)
        self.progress = theirs

    def _manifest(self) -> bytes:
        parts = [self.part_uri(i).rsplit("/", 1)[1] for i in range(self.progress.parts_total)]
        return json.dumps({
            "job_id": self.job.job_id, "model": self.job.model, "rows": self.rows, "parts": parts,
            "attempts": self.progress.attempts, "completed_by": self.owner,
            "source": {"topic": self.record.topic, "partition": self.record.partition, "offset": self.record.offset},
        }, indent=1).encode()


class PartFeed:
    """The unfinished parts of one URI job, read from its input in order, one at a time.

    The owner thread asks for the next part when its backlog has room and runs
    :meth:`read_next` on the I/O pool; only one read per job is ever in flight.
    """

    def __init__(self, parted: PartedJob, reader: RowReader, parts: list[int], params: dict, epoch: int,
                 check_rows: Callable[[list[str], list[Any]], None], *, served: Any = None) -> None:
        self.parent, self._reader, self._parts = parted, reader, deque(parts)
        self.served = served  # the model version its parts run on
        self._params, self._epoch, self._check_rows = params, epoch, check_rows
        self._lock = threading.Lock()  # close() may come from the owner while a read runs
        self._closed = False

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def parts_left(self) -> int:
        return len(self._parts)

    @property
    def next_rows(self) -> int:
        """Rows the next read brings into memory (0 when none is left)."""
        if not self._parts:
            return 0
        start, stop = self.parent.bounds(self._parts[0])
        return stop - start

    def read_next(self) -> PendingJob:
        """Read the next part (I/O thread); the input closes after the last one."""
        with self._lock:
            index = self._parts.popleft()
            start, stop = self.parent.bounds(index)
            try:
                ids, values = self._reader.read(start, stop)
                self._check_rows(ids, values)
            finally:
                if not self._parts:
                    self._close_locked()
        return PendingJob(self.parent.job, self.parent.record, ids, values, self.parent.part_uri(index),
                          self._params, epoch=self._epoch, parent=self.parent, part=index, served=self.served)

    def close(self) -> None:
        """Stop reading (a drain, a revoke, a failed part): waits for a read in flight."""
        with self._lock:
            self._parts.clear()
            self._close_locked()

    def _close_locked(self) -> None:
        if not self._closed:
            self._closed = True
            self._reader.close()


class PartPlanner:
    """Turns an opened URI job into the feed of its unfinished parts (I/O thread)."""

    def __init__(self, store: CheckpointStore, sink: ParquetSink, interval: CheckpointInterval, *,
                 owner: str, max_attempts: int, rows_per_s: Callable[[], float | None]) -> None:
        self.store, self.sink, self.interval = store, sink, interval
        self.owner, self.max_attempts, self._rows_per_s = owner, max_attempts, rows_per_s

    def plan(self, job: Job, record: Any, reader: RowReader, rows: int, params: dict, epoch: int,
             check_rows: Callable[[list[str], list[Any]], None], *, served: Any = None) -> PartFeed | None:
        """The feed of the parts still to do; None when a previous owner already
        finished the job. The feed owns ``reader`` from here on."""
        parted = self._take_up(job, record, rows)
        if parted.progress.complete:
            if not self.sink.exists(parted.manifest_uri):  # died between checkpoint and manifest
                self.sink.write_bytes(parted.manifest_uri, parted._manifest())  # noqa: SLF001
            return None
        return PartFeed(parted, reader, parted.progress.pending_parts(), params, epoch, check_rows, served=served)

    def _take_up(self, job: Job, record: Any, rows: int) -> PartedJob:
        """Load or create the checkpoint and record this attempt; poison jobs raise."""
        try:
            return self._take_up_once(job, record, rows)
        except StaleCheckpoint:
            raise RuntimeError(f"checkpoint of {job.job_id} keeps changing under us; "
                               "is another worker stuck on it?") from None

    @reload_retry  # another owner may save between our load and save: reload
    def _take_up_once(self, job: Job, record: Any, rows: int) -> PartedJob:
        progress = self.store.load(job.job_id)
        if progress is not None and progress.complete:
            return PartedJob(job, record, rows, progress, self.store, self.sink, self.owner)
        if progress is None:
            part_rows = self.interval.rows(self._rows_per_s())
            progress = Progress.new(job.job_id, parts_total=max(1, math.ceil(rows / part_rows)), owner=self.owner)
            progress.part_rows = part_rows
        progress.record_attempt(self.owner)
        if progress.attempts_without_progress() > self.max_attempts:
            self.store.delete(job.job_id)  # a fixed and republished job starts afresh
            history = "; ".join(f"{a.at:%H:%M:%S} {a.owner}" for a in progress.attempt_history[-self.max_attempts - 1:])
            raise JobError("too_many_attempts", f"{progress.attempts_without_progress() - 1} attempts finished "
                           f"no part (limit {self.max_attempts}): {history}")
        saved = self.store.save(progress, expected_generation=progress.generation or None)
        return PartedJob(job, record, rows, saved, self.store, self.sink, self.owner)
