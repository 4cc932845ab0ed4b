"""Dynamic batching across jobs.

Accepted jobs queue their rows here. A batch closes at ``max_batch_rows`` rows or
when its oldest row has waited ``max_wait_ms``, whichever comes first. A job bigger
than the room left in a batch is cut into segments; :class:`PendingJob` reassembles
the segments' outputs in row order, so the caller never sees the cut.
Jobs whose params differ never share a batch (params apply to a whole model call).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from kafka.structs import TopicPartition

from spotbatch.jobs import Job
from spotbatch.models.base import Outputs

__all__ = ["PendingJob", "Segment", "Batch", "Batcher"]


@dataclass(eq=False)
class PendingJob:
    """A job whose rows are queued or being inferred; collects outputs by row range."""

    job: Job
    record: Any  # the ConsumerRecord: its coordinates commit the job, its bytes feed the DLQ
    ids: list[str]
    values: list[Any]
    output_uri: str
    params: dict[str, Any]
    accepted_at: float = field(default_factory=time.monotonic)
    params_key: str = field(init=False)
    epoch: int = 0  # the partition's ownership epoch when accepted; stale after a revoke
    failed: bool = False
    parent: Any = None  # the PartedJob this part belongs to (URI jobs), else None
    part: int | None = None
    _parts: dict[int, Outputs] = field(default_factory=dict)
    _rows_done: int = 0

    @property
    def rows(self) -> int:
        return len(self.values)

    def __post_init__(self) -> None:
        self.params_key = json.dumps(self.params, sort_keys=True)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)

    @property
    def complete(self) -> bool:
        return self._rows_done == self.rows

    @property
    def rows_inferred(self) -> int:
        """Rows whose outputs exist only in memory so far (lost if the worker stops now)."""
        return self._rows_done

    def add_part(self, start: int, outputs: Outputs) -> None:
        n = len(next(iter(outputs.values())))
        self._parts[start] = outputs
        self._rows_done += n

    def outputs(self) -> Outputs:
        """The whole job's outputs, segments concatenated in row order."""
        parts = [self._parts[k] for k in sorted(self._parts)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


@dataclass(frozen=True)
class Segment:
    job: PendingJob
    start: int
    stop: int


@dataclass
class Batch:
    segments: list[Segment]
    params: dict[str, Any]

    @property
    def values(self) -> list[Any]:
        return [v for s in self.segments for v in s.job.values[s.start : s.stop]]

    @property
    def rows(self) -> int:
        return sum(s.stop - s.start for s in self.segments)

    def split(self, outputs: Outputs) -> list[tuple[Segment, Outputs]]:
        """Cut one model call's outputs back into per-segment outputs."""
        pieces, at = [], 0
        for seg in self.segments:
            n = seg.stop - seg.start
            pieces.append((seg, {k: v[at : at + n] for k, v in outputs.items()}))
            at += n
        return pieces


class Batcher:
    def __init__(self, *, max_batch_rows: int, max_wait_ms: int, clock: Callable[[], float] = time.monotonic):
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_ms / 1000
        self._clock = clock
        # (job, next row to hand out, time its rows became pending)
        self._queue: deque[list] = deque()
        self.pending_rows = 0

    def add(self, job: PendingJob) -> None:
        self._queue.append([job, 0, self._clock()])
        self.pending_rows += job.rows

    def seconds_until_due(self) -> float | None:
        """How long until a partial batch closes on max_wait; None when empty."""
        if not self._queue:
            return None
        if self._room_for_head() >= self.max_batch_rows:
            return 0.0
        return max(0.0, self._queue[0][2] + self.max_wait_s - self._clock())

    def next_batch(self, *, force: bool = False) -> Batch | None:
        """Close a batch if one is due (full, waited long enough, or ``force``)."""
        due = self.seconds_until_due()
        if due is None or (due > 0 and not force):
            return None
        head_key = self._queue[0][0].params_key
        segments, room = [], self.max_batch_rows
        while self._queue and room and self._queue[0][0].params_key == head_key:
            entry = self._queue[0]
            job, start = entry[0], entry[1]
            stop = min(job.rows, start + room)
            segments.append(Segment(job, start, stop))
            room -= stop - start
            if stop == job.rows:
                self._queue.popleft()
            else:
                entry[1] = stop
        batch = Batch(segments, segments[0].job.params)
        self.pending_rows -= batch.rows
        return batch

    def drop(self, keep: Callable[[PendingJob], bool]) -> list[PendingJob]:
        """Remove queued jobs for which ``keep`` is false (revoked partitions)."""
        dropped = [e[0] for e in self._queue if not keep(e[0])]
        self._queue = deque(e for e in self._queue if keep(e[0]))
        self.pending_rows = sum(e[0].rows - e[1] for e in self._queue)
        return dropped

    def __len__(self) -> int:
        return len(self._queue)

    def _room_for_head(self) -> int:
        """Rows available for a batch led by the head job's params."""
        key, rows = self._queue[0][0].params_key, 0
        for job, start, _ in self._queue:
            if job.params_key != key or rows >= self.max_batch_rows:
                break
            rows += job.rows - start
        return rows
