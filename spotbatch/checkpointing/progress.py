"""Progress: what a worker has durably finished of one job, and who has tried it.

A job is cut into parts (see interval.py for how big); a part is done once its output
is durable. The record is what a worker saves after each part and reloads after a
preemption, so the next owner skips finished parts instead of redoing them.
``attempts`` counts how many times workers took the job up: a job that keeps killing
its workers (a poison job) shows up here and can be sent to the DLQ.
"""

from __future__ import annotations

import bisect
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from spotbatch.jobs import JobId

__all__ = ["Progress", "AttemptRecord", "MAX_ATTEMPT_HISTORY"]

# Enough to see a pattern (same error every time? same node?) while keeping the
# record a few KB however often a job is retried.
MAX_ATTEMPT_HISTORY = 20

_Owner = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Record(BaseModel):
    # validate_assignment: a bad value fails where it is set, not at the next load.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AttemptRecord(_Record):
    at: AwareDatetime
    owner: _Owner
    error: Annotated[str, StringConstraints(max_length=2000)] | None = None
    rows_done: int = Field(default=0, ge=0)  # the job's progress when this attempt began
    released: bool = False  # ended by a drain (a notice or SIGTERM): no sign of a poison job


class Progress(_Record):
    """One job's checkpoint. Stores bump ``generation`` and set ``updated_at`` on save."""

    schema_version: Literal[1] = 1  # lets a future layout be told apart on load
    job_id: JobId
    parts_total: int = Field(ge=0)
    part_rows: int | None = Field(default=None, ge=1)  # rows per part (the last may be short)
    parts_done: list[int] = Field(default_factory=list)
    rows_done: int = Field(default=0, ge=0)
    attempts: int = Field(default=0, ge=0)
    attempt_history: list[AttemptRecord] = Field(default_factory=list, max_length=MAX_ATTEMPT_HISTORY)
    owner: _Owner
    generation: int = Field(default=0, ge=0)  # 0: never saved
    created_at: AwareDatetime = Field(default_factory=_utcnow)
    updated_at: AwareDatetime = Field(default_factory=_utcnow)
    complete: bool = False

    @model_validator(mode="after")
    def _check_parts(self) -> "Progress":
        done = self.parts_done
        if done != sorted(set(done)):
            raise ValueError("parts_done must be sorted and without repeats")
        if done and (done[0] < 0 or done[-1] >= self.parts_total):
            raise ValueError(f"parts_done holds an index outside 0..{self.parts_total - 1}")
        return self

    @classmethod
    def new(cls, job_id: str, *, parts_total: int, owner: str) -> "Progress":
        return cls(job_id=job_id, parts_total=parts_total, owner=owner)

    def pending_parts(self) -> list[int]:
        """Part indexes still to do, in order."""
        done = set(self.parts_done)
        return [i for i in range(self.parts_total) if i not in done]

    def mark_part_done(self, index: int, rows: int) -> bool:
        """Record part ``index`` (``rows`` rows) as durable; False if it already was.

        Counting a part once keeps ``rows_done`` right when a redelivered job redoes
        a part whose checkpoint never landed.
        """
        if index in self.parts_done:
            return False
        if rows < 0:
            raise ValueError(f"rows must be >= 0, got {rows}")
        done = list(self.parts_done)
        bisect.insort(done, index)
        self.parts_done = done  # assignment validates the index range
        self.rows_done += rows
        self.complete = len(done) == self.parts_total
        return True

    def record_attempt(self, owner: str, error: str | None = None) -> None:
        """A worker takes the job up (``error``: why the previous try ended, if known)."""
        entry = AttemptRecord(at=_utcnow(), owner=owner, error=_clip(error), rows_done=self.rows_done)
        self.attempt_history = [*self.attempt_history, entry][-MAX_ATTEMPT_HISTORY:]
        self.attempts += 1
        self.owner = owner

    def attempts_without_progress(self) -> int:
        """Trailing attempts that began at today's progress: the previous ones got nowhere.

        A preempted attempt that finished a part does not count, so a long job on a
        busy spot pool is never mistaken for a poison job; one that kills its worker
        before any part is durable counts every time.
        """
        n = 0
        for entry in reversed(self.attempt_history):
            if entry.rows_done != self.rows_done:
                break
            n += not entry.released
        return n

    def release_attempt(self, owner: str) -> None:
        """``owner``'s latest attempt ended in a drain: it does not count as a failure."""
        for i in range(len(self.attempt_history) - 1, -1, -1):
            if self.attempt_history[i].owner == owner:
                history = list(self.attempt_history)
                history[i] = history[i].model_copy(update={"released": True})
                self.attempt_history = history
                return

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "Progress":
        return cls.model_validate_json(data)


def _clip(error: str | None) -> str | None:
    # A traceback can be huge; its first line is what a person scans for.
    if error is None:
        return None
    line = error.strip().splitlines()[0] if error.strip() else ""
    return line[:2000]
