"""The inference thread: runs batches beside the consumer-owning thread.

It takes closed batches from an inbox where the owner stages up to
``max_in_flight`` of them (so the model never waits for the owner's next loop turn)
and hands results back through an outbox the owner drains. A batch that fails for a reason other than a JobError is retried one
segment at a time, so one job's poison row cannot fail its batch-mates.
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

RunFn = Callable[[list[Any], dict[str, Any]], Outputs]


@dataclass
class BatchResult:
    batch: Batch
    seconds: float
    parts: list[tuple[Segment, Outputs]] = field(default_factory=list)
    failures: list[tuple[PendingJob, JobError]] = field(default_factory=list)


class InferenceThread:
    def __init__(self, run: RunFn, *, max_in_flight: int = 2) -> None:
        self._run = run
        self.max_in_flight = max(1, max_in_flight)
        self._inbox: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[BatchResult] = queue.SimpleQueue()
        self._busy = 0  # batches submitted and not yet returned; owner-thread only
        self._busy_rows = 0  # their rows
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

    def wait(self, timeout_s: float) -> list[BatchResult]:
        """Block up to ``timeout_s`` for at least one result (used while draining)."""
        try:
            first = self.outbox.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return []
        self._returned([first])
        return [first, *self.results()]

    def _returned(self, results: list[BatchResult]) -> None:
        self._busy -= len(results)
        self._busy_rows -= sum(r.batch.rows for r in results)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the staged batches (the daemon thread dies with the process anyway)."""
        self._inbox.put(None)
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while (batch := self._inbox.get()) is not None:
            start = time.perf_counter()
            result = BatchResult(batch, 0.0)
            try:
                result.parts = batch.split(self._run(batch.values, batch.params))
            except Exception as exc:  # noqa: BLE001 - isolated per segment below
                self._run_alone(batch, exc, result)
            result.seconds = time.perf_counter() - start
            self.outbox.put(result)

    def _run_alone(self, batch: Batch, first: Exception, result: BatchResult) -> None:
        if len(batch.segments) == 1:
            result.failures = [(s.job, _as_job_error(first)) for s in batch.segments]
            return
        log.warning("batch of %d segments failed (%s); retrying each alone", len(batch.segments), first)
        for seg in batch.segments:
            values = seg.job.values[seg.start : seg.stop]
            try:
                result.parts.append((seg, self._run(values, batch.params)))
            except Exception as exc:  # noqa: BLE001
                result.failures.append((seg.job, _as_job_error(exc)))


def _as_job_error(exc: Exception) -> JobError:
    if isinstance(exc, JobError):
        return exc
    return JobError("inference_failed", f"{type(exc).__name__}: {exc}")
