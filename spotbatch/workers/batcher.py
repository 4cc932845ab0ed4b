"""Dynamic batching across jobs.

Accepted jobs queue their rows here. A batch closes at ``max_batch_rows`` rows or
when its oldest row has waited ``max_wait_ms``, whichever comes first. A job bigger
than the room left in a batch is cut into segments; :class:`PendingJob` reassembles
the segments' outputs in row order, so the caller never sees the cut.
Jobs whose params differ never share a batch (params apply to a whole model call).

Token-aware batching (text models with a prepare stage, see models/base.py): given
``prepare``, each job is tokenised when it is added (here, on the owner thread, never
the inference thread; a fast tokenizer encodes in Rust without the GIL), and batches
form from a *window*: the queued rows of the head's params, up to ``window_rows``.
The window closes when that many rows are queued or its oldest row waited
``max_wait_ms``; its rows are sorted by token count and cut into batches whose cost,
padded length x rows, stays within ``max_batch_tokens`` (and rows within
``max_batch_rows``). Padding to the longest row of a batch of look-alikes costs little.
Inside a batch the rows go back to job and row order, so each job's rows in it are a
few contiguous segments and ``PendingJob`` reassembles them by row range as before.
Without ``prepare`` (tiny, tensor models) batches are formed by rows, in arrival order.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from kafka.structs import TopicPartition

from spotbatch.jobs import Job
from spotbatch.models.base import Outputs, Prepared

__all__ = ["PendingJob", "Segment", "Batch", "Batcher"]

log = logging.getLogger(__name__)


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
    prepared: Prepared | None = None  # the prepare stage's rows (token ids), if the model has one
    served: Any = None  # the versions.Served that runs it (None: the worker's one model)
    shadow: "PendingJob | None" = None  # the challenger's run of the same rows (shadowed champion job)
    shadow_of: "PendingJob | None" = None  # on a shadow unit: the job it shadows (never written)
    _parts: dict[int, Outputs] = field(default_factory=dict)
    _rows_done: int = 0

    @property
    def rows(self) -> int:
        return len(self.values)

    def __post_init__(self) -> None:
        # Jobs share a batch only with the same params and the same model version.
        served = "" if self.served is None else self.served.key
        self.params_key = served + json.dumps(self.params, sort_keys=True)

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
    def values(self) -> list[Any] | Prepared:
        """The rows in model order: Prepared when every job was prepared, else raw values."""
        prepared = [s.job.prepared for s in self.segments]
        if prepared and all(p is not None for p in prepared):
            return Prepared.concat([p[s.start : s.stop] for p, s in zip(prepared, self.segments) if p is not None])
        return [v for s in self.segments for v in s.job.values[s.start : s.stop]]

    @property
    def tokens(self) -> int:
        """Padded cost: longest row x rows (0 for batches of unprepared jobs)."""
        values = self.values
        return int(values.lengths.max(initial=0)) * self.rows if isinstance(values, Prepared) else 0

    @property
    def rows(self) -> int:
        return sum(s.stop - s.start for s in self.segments)

    @property
    def served(self) -> Any:
        """What runs the batch: every segment's job has the same (see params_key)."""
        return self.segments[0].job.served if self.segments else None

    def split(self, outputs: Outputs) -> list[tuple[Segment, Outputs]]:
        """Cut one model call's outputs back into per-segment outputs."""
        pieces, at = [], 0
        for seg in self.segments:
            n = seg.stop - seg.start
            pieces.append((seg, {k: v[at : at + n] for k, v in outputs.items()}))
            at += n
        return pieces


class Batcher:
    def __init__(self, *, max_batch_rows: int, max_wait_ms: int, clock: Callable[[], float] = time.monotonic,
                 max_batch_tokens: int | None = None, prepare: Callable[["PendingJob"], Prepared | None] | None = None,
                 window_rows: int | None = None):
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1 (or None: batch by rows)")
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_ms / 1000
        self.max_batch_tokens = max_batch_tokens
        self._prepare = prepare
        # Sorting needs more rows than one batch to choose from; 16 batches' worth
        # leaves the look-alikes close together and bounds how long a row waits.
        self.window_rows = window_rows or 16 * max_batch_rows
        self._clock = clock
        # (job, next row to hand out, time its rows became pending)
        self._queue: deque[list] = deque()
        self._ready: deque[Batch] = deque()  # a closed, sorted window's batches, not handed out yet
        self.pending_rows = 0

    @property
    def sorts(self) -> bool:
        """Token-aware: rows are measured by the prepare stage and sorted in windows."""
        return self._prepare is not None

    def add(self, job: PendingJob) -> None:
        if self._prepare is not None and job.prepared is None:
            try:
                job.prepared = self._prepare(job)
            except Exception as exc:  # noqa: BLE001 - unprepared rows run through predict(), which reports it
                log.warning("prepare failed for job %s (%s); batching it unsorted", job.job.job_id, exc)
        self._queue.append([job, 0, self._clock()])
        self.pending_rows += job.rows

    def seconds_until_due(self) -> float | None:
        """How long until a partial batch closes on max_wait; None when empty."""
        if self._ready:
            return 0.0
        if not self._queue:
            return None
        if self._room_for_head() >= self._full_rows:
            return 0.0
        return max(0.0, self._queue[0][2] + self.max_wait_s - self._clock())

    def next_batch(self, *, force: bool = False) -> Batch | None:
        """Close a batch if one is due (full, waited long enough, or ``force``)."""
        if not self._ready:
            due = self.seconds_until_due()
            if due is None or (due > 0 and not force):
                return None
            window = self._take(self._full_rows)
            if not self.sorts:
                self._ready.append(Batch(window, window[0].job.params))
            else:
                self._ready.extend(self._sorted_batches(window))
        batch = self._ready.popleft()
        self.pending_rows -= batch.rows
        return batch

    def drop(self, keep: Callable[[PendingJob], bool]) -> list[PendingJob]:
        """Remove queued jobs for which ``keep`` is false (revoked partitions)."""
        dropped = {id(e[0]): e[0] for e in self._queue if not keep(e[0])}
        self._queue = deque(e for e in self._queue if keep(e[0]))
        ready: deque[Batch] = deque()
        for batch in self._ready:
            dropped.update((id(s.job), s.job) for s in batch.segments if not keep(s.job))
            segments = [s for s in batch.segments if keep(s.job)]
            if segments:
                ready.append(Batch(segments, batch.params))
        self._ready = ready
        self.pending_rows = sum(e[0].rows - e[1] for e in self._queue) + sum(b.rows for b in self._ready)
        return list(dropped.values())

    def __len__(self) -> int:
        return len(self._queue) + len(self._ready)

    @property
    def _full_rows(self) -> int:
        return self.window_rows if self.sorts else self.max_batch_rows

    def _room_for_head(self) -> int:
        """Rows available for a batch led by the head job's params."""
        key, rows, full = self._queue[0][0].params_key, 0, self._full_rows
        for job, start, _ in self._queue:
            if job.params_key != key or rows >= full:
                break
            rows += job.rows - start
        return rows

    def _take(self, room: int) -> list[Segment]:
        """Up to ``room`` queued rows of the head's params, in arrival order."""
        head_key = self._queue[0][0].params_key
        segments = []
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
        return segments

    def _sorted_batches(self, window: list[Segment]) -> list[Batch]:
        """Cut a window, sorted by tokens, into batches within the token and row budgets."""
        rows = [(_length(s.job, i), n, i) for n, s in enumerate(window) for i in range(s.start, s.stop)]
        rows.sort()
        batches: list[list[tuple[int, int, int]]] = []
        current: list[tuple[int, int, int]] = []
        for row in rows:
            # Sorted ascending: the row joining is the batch's longest, so the cost is its length x rows.
            cost = row[0] * (len(current) + 1)
            if current and (len(current) >= self.max_batch_rows
                            or (self.max_batch_tokens is not None and cost > self.max_batch_tokens)):
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
        params = window[0].job.params
        # Longest first: a batch that runs out of GPU memory shows it at once.
        return [Batch(_segments(window, b), params) for b in reversed(batches)]


def _length(job: PendingJob, row: int) -> int:
    return 0 if job.prepared is None else int(job.prepared.lengths[row])


def _segments(window: list[Segment], rows: list[tuple[int, int, int]]) -> list[Segment]:
    """One batch's rows (length, segment index, row) back in job and row order, as runs."""
    out: list[Segment] = []
    for _, n, i in sorted(rows, key=lambda r: (r[1], r[2])):
        job = window[n].job
        if out and out[-1].job is job and out[-1].stop == i:
            out[-1] = Segment(job, out[-1].start, i + 1)
        else:
            out.append(Segment(job, i, i + 1))
    return out
