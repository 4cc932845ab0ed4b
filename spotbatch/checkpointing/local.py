"""Checkpoints in a local folder: ``<root>/<job_id>.json``, one file per job.

Writes go through storage.LocalStore (temp + fsync + rename + folder fsync), so a
crash leaves the old record or the new one. The generation check and the write run
under an exclusive ``flock`` on ``<root>/<job_id>.lock``, so of two processes saving
against the same generation exactly one wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

from spotbatch.storage import LocalStore, parse_uri

from .progress import Progress
from .store import StaleCheckpoint, check_job_id, decode, next_generation

__all__ = ["LocalCheckpointStore"]

_FILES = LocalStore()


class LocalCheckpointStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        loc = parse_uri(os.fspath(root))
        if loc.scheme != "file":
            raise ValueError(f"{root!r} is not a local folder")
        self.root = loc.path

    def load(self, job_id: str) -> Progress | None:
        path = self._path(job_id, ".json")
        try:
            data = _FILES.read_bytes(path)
        except FileNotFoundError:
            return None
        return decode(data, job_id, path)

    def save(self, progress: Progress, *, expected_generation: int | None) -> Progress:
        job_id = progress.job_id
        with self._locked(job_id):
            current = self.load(job_id)
            found = current.generation if current else None
            if found != expected_generation:
                raise StaleCheckpoint(job_id, expected_generation, found)
            saved = next_generation(progress, expected_generation)
            _FILES.write_atomic(self._path(job_id, ".json"), saved.to_json())
        return saved

    def delete(self, job_id: str) -> None:
        with self._locked(job_id):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(job_id, ".json"))
        # The lock file stays: unlinking it while another process waits on it would let
        # a third lock a fresh file of the same name, and two would hold "the" lock.

    def _path(self, job_id: str, suffix: str) -> str:
        return os.path.join(self.root, check_job_id(job_id) + suffix)

    @contextlib.contextmanager
    def _locked(self, job_id: str) -> Iterator[None]:
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self._path(job_id, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, even if we crash
            yield
        finally:
            os.close(fd)
