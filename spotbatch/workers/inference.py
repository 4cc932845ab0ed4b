"""The inference thread: runs batches beside the consumer-owning thread.

It takes closed batches from an inbox where the owner stages up to
``max_in_flight`` of them (so the model never waits for the owner's next loop turn)
and hands results back through an outbox the owner drains. A batch that fails for a reason other than a JobError is retried one
job at a time, so one job's poison row cannot fail its batch-mates.

With ``stage`` (``BatchRunner.stage``: collate and start the copy to the device), a
second thread stages batch N+1 while batch N computes, one batch ahead: on a GPU the
host work and the upload hide behind the model. A batch whose staging fails runs
unstaged, so the failure is the model call's to report.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from spotbatch.errors import JobError
from spotbatch.models.base import Outputs
from spotbatch.workers.batcher import Batch, PendingJob, Segment

__all__ = ["BatchResult", "InferenceThread"]

log = logging.getLogger(__name__)

RunFn = Callable[[Any, dict[str, Any]], Outputs]  # values: a list, or Prepared/Staged rows
StageFn = Callable[[Any], Any]


@dataclass
class BatchResult:
    batch: Batch
    seconds: float
    parts: list[tuple[Segment, Outputs]] = field(default_factory=list)
    failures: list[tuple[PendingJob, JobError]] = field(default_factory=list)


class InferenceThread:
    def __init__(self, run: RunFn | None, *, max_in_flight: int = 2, stage: StageFn | None = None,
                 run_for: Callable[[Batch], RunFn] | None = None,
                 stage_for: Callable[[Batch], StageFn | None] | None = None) -> None:
        """``run``/``stage`` serve every batch; ``run_for``/``stage_for`` pick them per
        batch instead (a worker serving two model versions)."""
        if run_for is None:
            if run is None:
                raise ValueError("give run or run_for")
            run_for = _always(run)
        self._run_for: Callable[[Batch], RunFn] = run_for
        self._stage_for: Callable[[Batch], StageFn | None] = stage_for or _always(stage)
        self.max_in_flight = max(1, max_in_flight)
        self._inbox: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[BatchResult] = queue.SimpleQueue()
        self._busy = 0  # batches submitted and not yet returned; owner-thread only
        self._busy_rows = 0  # their rows
        # Staged batches hold device memory: one ahead of the model is enough to overlap.
        self._staged: queue.Queue[tuple[Batch, Any] | None] = queue.Queue(maxsize=1)
        self._stager = None
        if stage is not None or stage_for is not None:
            self._stager = threading.Thread(target=self._stage_loop, name="inference-stage", daemon=True)
            self._stager.start()
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return self._busy

    @property
    def rows_in_flight(self) -> int:
        return self._busy_rows

    def can_take(self) -> bool:
        return self._busy < self.max_in_flight

    @property
    def hungry(self) -> bool:
        """Fewer than two batches queued: the owner should turn its loop soon."""
        return self._busy < 2

    def submit(self, batch: Batch) -> None:
        self._busy += 1
        self._busy_rows += batch.rows
        self._inbox.put(batch)

    def results(self) -> list[BatchResult]:
        out = []
        while True:
            try:
                out.append(self.outbox.get_nowait())
            except queue.Empty:
                break
        self._returned(out)
        return out

    def _returned(self, results: list[BatchResult]) -> None:
        self._busy -= len(results)
        self._busy_rows -= sum(r.batch.rows for r in results)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the staged batches (the daemon thread dies with the process anyway)."""
        self._inbox.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in (self._stager, self._thread):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    def _stage_loop(self) -> None:
        while (batch := self._inbox.get()) is not None:
            values: Any = batch.values
            try:
                stage = self._stage_for(batch)
                if stage is not None:
                    values = stage(values)
            except Exception as exc:  # noqa: BLE001 - the model call reports it, unstaged
                log.warning("staging a batch of %d rows failed (%s); running it unstaged", batch.rows, exc)
            self._staged.put((batch, values))
        self._staged.put(None)

    def _next(self) -> tuple[Batch, Any] | None:
        if self._stager is not None:
            return self._staged.get()
        batch = self._inbox.get()
        return None if batch is None else (batch, batch.values)

    def _loop(self) -> None:
        while (item := self._next()) is not None:
            batch, values = item
            start = time.perf_counter()
            result = BatchResult(batch, 0.0)
            try:
                result.parts = batch.split(self._run_for(batch)(values, batch.params))
            except Exception as exc:  # noqa: BLE001 - isolated per job below
                self._run_alone(batch, exc, result)
            del values  # a staged batch's device memory goes before the next one runs
            result.seconds = time.perf_counter() - start
            self.outbox.put(result)

    def _run_alone(self, batch: Batch, first: Exception, result: BatchResult) -> None:
        by_job: dict[int, list[Segment]] = {}
        for seg in batch.segments:  # a sorted batch holds a job as several runs
            by_job.setdefault(id(seg.job), []).append(seg)
        if len(by_job) == 1:
            result.failures = [(batch.segments[0].job, _as_job_error(first))]
            return
        log.warning("batch of %d jobs failed (%s); retrying each alone", len(by_job), first)
        for segments in by_job.values():
            alone = Batch(segments, batch.params)
            try:
                result.parts += alone.split(self._run_for(batch)(alone.values, batch.params))
            except Exception as exc:  # noqa: BLE001
                result.failures.append((segments[0].job, _as_job_error(exc)))


def _always(value: Any) -> Callable[[Batch], Any]:
    return lambda batch: value


def _as_job_error(exc: Exception) -> JobError:
    if isinstance(exc, JobError):
        return exc
    return JobError("inference_failed", f"{type(exc).__name__}: {exc}")
