"""Inline jobs on their way to the model: recorded in the attempt ledger first, and
suspects (see attempts.py) one at a time, alone on the model."""

from __future__ import annotations

from collections import defaultdict, deque
from concurrent.futures import Executor, Future
from typing import Callable

from kafka.structs import TopicPartition

from spotbatch.errors import JobError
from spotbatch.workers.attempts import AttemptLedger
from spotbatch.workers.batcher import Batch, Batcher, PendingJob

__all__ = ["Admission"]


class Admission:
    """Owner-thread bookkeeping; the ledger's writes run on the I/O pool."""

    def __init__(self, ledger: AttemptLedger, io: Executor, *, max_batch_rows: int) -> None:
        self._ledger, self._io = ledger, io
        self._fresh: dict[TopicPartition, list[PendingJob]] = defaultdict(list)  # this turn's, unrecorded
        self._recording: list[tuple[Future, list[PendingJob]]] = []
        self._suspects: deque[PendingJob] = deque()
        self._current: PendingJob | None = None  # the suspect on the model
        self._current_recorded: Future | None = None
        self._alone = Batcher(max_batch_rows=max_batch_rows, max_wait_ms=0)

    def admit(self, unit: PendingJob) -> None:
        """Queue a new inline unit; raises JobError (too_many_attempts) for a poison job."""
        tp, offset = unit.tp, unit.record.offset
        prior = self._ledger.prior(tp.topic, tp.partition, offset)
        if len(prior) >= self._ledger.max_attempts:
            raise JobError("too_many_attempts", f"{len(prior)} workers took this job up and died before it was "
                           f"durable (limit {self._ledger.max_attempts}): {self._ledger.history(prior)}")
        if prior:
            self._suspects.append(unit)
        else:
            self._fresh[tp].append(unit)

    def record(self, committed: Callable[[TopicPartition], int | None]) -> None:
        """One ledger write per partition for this turn's fresh units (I/O pool)."""
        for tp, units in self._fresh.items():
            if self._ledger.take_up(tp.topic, tp.partition, [u.record.offset for u in units]):
                self._recording.append((self._io.submit(self._ledger.save, tp.topic, tp.partition, committed(tp)),
                                        units))
        self._fresh.clear()

    def recorded(self) -> list[PendingJob]:
        """Units whose attempt is durable, for the batcher; a failed write raises."""
        ready = []
        for fut, units in [item for item in self._recording if item[0].done()]:
            self._recording.remove((fut, units))
            fut.result()  # the checkpoint store is down: an infrastructure fault
            ready += units
        return ready

    def next_suspect_batch(self, *, model_idle: bool, done: Callable[[PendingJob], bool]) -> Batch | None:
        """The current suspect's next batch; a new suspect starts only on an idle model,
        once the one before is ``done`` (durable or failed), and once it is recorded."""
        if self._current is not None and done(self._current) and not len(self._alone):
            self._current = self._current_recorded = None
        if self._current is None:
            if not self._suspects or not model_idle:
                return None
            self._current = unit = self._suspects.popleft()
            self._ledger.take_up(unit.tp.topic, unit.tp.partition, [unit.record.offset])
            self._current_recorded = self._io.submit(self._ledger.save, unit.tp.topic, unit.tp.partition)
            self._alone.add(unit)
        recorded = self._current_recorded
        if recorded is None or not recorded.done():
            return None
        recorded.result()
        return self._alone.next_batch(force=True)

    @property
    def isolating(self) -> bool:
        """Suspects wait or run: nothing else goes to the model meanwhile."""
        return bool(self._suspects) or self._current is not None

    @property
    def rows(self) -> int:
        waiting = [u for _, units in self._recording for u in units] + list(self._suspects)
        return sum(u.rows for u in waiting) + self._alone.pending_rows

    def __len__(self) -> int:
        return len(self._recording) + len(self._suspects) + (self._current is not None)

    def drop(self, keep: Callable[[PendingJob], bool]) -> list[PendingJob]:
        """Forget units for which ``keep`` is false (revoked partitions, a drain)."""
        dropped = [u for u in self._suspects if not keep(u)]
        self._suspects = deque(u for u in self._suspects if keep(u))
        for i, (fut, units) in enumerate(self._recording):
            dropped += [u for u in units if not keep(u)]
            self._recording[i] = (fut, [u for u in units if keep(u)])
        if self._current is not None and not keep(self._current):
            dropped += self._alone.drop(keep)
            self._current = self._current_recorded = None
        return dropped
