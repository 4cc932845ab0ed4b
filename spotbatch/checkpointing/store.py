"""The checkpoint store seam: load / compare-and-save / delete one Progress per job.

``save`` is a compare-and-swap on ``generation``: the caller names the generation it
loaded (None: "there is none yet") and the save fails with StaleCheckpoint if the
stored one differs. So a worker that was presumed dead (preempted, partitioned) and
comes back cannot overwrite the progress of the worker that took its job over.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Protocol

from pydantic import TypeAdapter, ValidationError

from spotbatch.jobs import JobId

from .progress import Progress

__all__ = ["CheckpointStore", "StaleCheckpoint", "CorruptCheckpoint", "next_generation", "decode", "check_job_id"]

# jobs.JobId's rule: safe as a file name and an S3 key, and never starting with ".".
_JOB_ID = TypeAdapter(JobId)


class StaleCheckpoint(Exception):
    """The stored generation is not the one the caller expected: reload, then decide."""

    def __init__(self, job_id: str, expected: int | None, found: int | None) -> None:
        def show(gen: int | None) -> str:
            return "none" if gen is None else str(gen)

        super().__init__(
            f"checkpoint for job {job_id!r} is stale: expected generation {show(expected)}, "
            f"store holds {show(found)}"
        )
        self.job_id = job_id
        self.expected = expected
        self.found = found


class CorruptCheckpoint(Exception):
    """A stored checkpoint that does not parse as a Progress for its job."""


class CheckpointStore(Protocol):
    def load(self, job_id: str) -> Progress | None: ...

    def save(self, progress: Progress, *, expected_generation: int | None) -> Progress: ...

    def delete(self, job_id: str) -> None: ...


def check_job_id(job_id: str) -> str:
    try:
        return _JOB_ID.validate_python(job_id)
    except ValidationError:
        raise ValueError(f"job id {job_id!r} is not usable as a checkpoint name") from None


def next_generation(progress: Progress, expected_generation: int | None) -> Progress:
    """The record as it will be stored: a deep copy, generation bumped, stamped now."""
    if expected_generation is not None and expected_generation < 0:
        raise ValueError(f"expected_generation must be >= 0 or None, got {expected_generation}")
    return progress.model_copy(
        deep=True,  # the caller's record and the stored one must not share lists
        update={"generation": (expected_generation or 0) + 1, "updated_at": datetime.now(timezone.utc)},
    )


def decode(data: bytes, job_id: str, where: str) -> Progress:
    try:
        progress = Progress.from_json(data)
    except ValidationError as exc:
        raise CorruptCheckpoint(f"{where}: not a valid checkpoint ({exc.error_count()} errors): {exc}") from None
    if progress.job_id != job_id:
        raise CorruptCheckpoint(f"{where}: holds job {progress.job_id!r}, expected {job_id!r}")
    return progress
