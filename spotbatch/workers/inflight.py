"""The in-flight ledger: every accepted unit of work, in one explicit state.

A unit (an inline job, or one part of a URI job) enters when it is admitted and moves

    ADMITTED -> QUEUED -> INFERRING -> WRITING -> (leaves: durable)

leaving early when it fails or its partition is revoked. A suspect (see attempts.py)
goes from ADMITTED straight to INFERRING, alone on the model. On a drain, queued parts
of URI jobs are PARKED: checkpointed and resumable by the next owner, they only count
toward the rows the stop lost. Each state is a fact the loop asks about: what a SIGKILL
would lose now (rows inferred but not durable), whether writes are on their way, which
parted jobs are unfinished. A move the table below does not allow is a bug in the loop,
and raises at once rather than miscounting the loss bound later.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future
from typing import Callable, Iterator

from spotbatch.workers.batcher import PendingJob

__all__ = ["State", "InFlight"]


class State(enum.Enum):
    ADMITTED = "admitted"  # its attempt is being recorded (admission.py)
    QUEUED = "queued"  # rows in the batcher
    INFERRING = "inferring"  # some rows in a batch on the model (a unit may span batches)
    WRITING = "writing"  # every row inferred; its write is on the I/O pool
    PARKED = "parked"  # left for the next owner by a drain


_MOVES: dict[State, frozenset[State]] = {
    State.ADMITTED: frozenset({State.QUEUED, State.INFERRING}),
    State.QUEUED: frozenset({State.INFERRING, State.PARKED}),
    State.INFERRING: frozenset({State.INFERRING, State.WRITING}),
    State.WRITING: frozenset(),
    State.PARKED: frozenset(),
}


class InFlight:
    """Owner-thread only: units by state, and the write future of each WRITING unit."""

    def __init__(self) -> None:
        self._state: dict[PendingJob, State] = {}
        self._writes: dict[PendingJob, Future] = {}

    def enter(self, unit: PendingJob, state: State = State.ADMITTED) -> None:
        if unit in self._state:
            raise RuntimeError(f"unit of job {unit.job.job_id} entered the ledger twice")
        if state not in (State.ADMITTED, State.QUEUED):
            raise RuntimeError(f"a unit enters admitted or queued, not {state.value}")
        self._state[unit] = state

    def move(self, unit: PendingJob, state: State) -> None:
        now = self._state[unit]
        if state not in _MOVES[now]:
            raise RuntimeError(f"job {unit.job.job_id}: no move from {now.value} to {state.value}")
        self._state[unit] = state

    def writing(self, unit: PendingJob, write: Future) -> None:
        self.move(unit, State.WRITING)
        self._writes[unit] = write

    def leave(self, unit: PendingJob) -> None:
        """Durable, failed or abandoned: the unit is no longer this worker's to lose."""
        self._state.pop(unit, None)
        self._writes.pop(unit, None)

    def leave_all(self, units: list[PendingJob]) -> None:
        for unit in units:
            self.leave(unit)

    def written(self) -> list[tuple[PendingJob, Future]]:
        """Remove and return the units whose write finished, oldest first."""
        done = [(unit, fut) for unit, fut in self._writes.items() if fut.done()]
        for unit, _ in done:
            self.leave(unit)
        return done

    def park(self, which: Callable[[PendingJob], bool]) -> None:
        for unit, state in self._state.items():
            if state is State.QUEUED and which(unit):
                self._state[unit] = State.PARKED

    # ---- what the loop asks ----------------------------------------------------

    def __contains__(self, unit: object) -> bool:
        return unit in self._state

    def __len__(self) -> int:
        return len(self._state)

    def __iter__(self) -> Iterator[PendingJob]:
        return iter(list(self._state))

    def state_of(self, unit: PendingJob) -> State | None:
        return self._state.get(unit)

    @property
    def writes_pending(self) -> bool:
        return bool(self._writes)

    @property
    def rows_at_risk(self) -> int:
        """Rows inferred whose unit is not durable: what a SIGKILL would cost now."""
        return sum(unit.rows_inferred for unit in self._state)
