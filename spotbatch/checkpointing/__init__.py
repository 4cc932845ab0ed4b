"""Job progress checkpoints: the record, the stores (local folder, S3), the interval.

    store = store_for_checkpoints("s3://bucket/checkpoints")   # or a local folder
    progress = store.load(job_id)
    if progress is None:
        progress, expected = Progress.new(job_id, parts_total=n, owner=me), None
    else:
        expected = progress.generation
    progress.record_attempt(me)
    # Raises StaleCheckpoint if another worker saved since we loaded: reload, decide.
    progress = store.save(progress, expected_generation=expected)
"""

from __future__ import annotations

from spotbatch.storage import parse_uri

from .interval import DEFAULT_MTBI_S, MAX_PART_ROWS, CheckpointInterval, wasted_fraction, young_interval_s
from .local import LocalCheckpointStore
from .progress import MAX_ATTEMPT_HISTORY, AttemptRecord, Progress
from .s3 import S3CheckpointStore
from .store import CheckpointStore, CorruptCheckpoint, StaleCheckpoint

__all__ = [
    "Progress",
    "AttemptRecord",
    "MAX_ATTEMPT_HISTORY",
    "CheckpointStore",
    "StaleCheckpoint",
    "CorruptCheckpoint",
    "LocalCheckpointStore",
    "S3CheckpointStore",
    "store_for_checkpoints",
    "CheckpointInterval",
    "young_interval_s",
    "wasted_fraction",
    "DEFAULT_MTBI_S",
    "MAX_PART_ROWS",
]


def store_for_checkpoints(uri: str) -> CheckpointStore:
    """The checkpoint store for a local path, ``file://`` URI or ``s3://bucket/prefix``."""
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        return S3CheckpointStore(loc.uri)
    return LocalCheckpointStore(loc.path)
