"""Crash-loop breaker for inline jobs: who took which offsets up, written before work starts.

A URI job counts its attempts in its own checkpoint (parts.py). An inline job has none,
so one that kills its worker where no exception boundary reaches (a native crash in
the model, an OOM kill) would be redelivered to every restart and stall its partition
for good. So before the work of a turn's new inline jobs starts, the worker writes one
ledger object per partition (``<checkpoints>/_attempts/<topic>/<partition>.json``)
naming, per owner session, the offsets it took up: one write per partition per turn,
however many jobs. A drain or a revoke marks the session released: no sign of poison.

An offset that an earlier, unreleased session took up is a *suspect*: its worker died
with it in flight. Suspects run alone (their own batch, nothing else on the model),
one at a time, each recorded by itself right before it starts: so the job that keeps
killing workers is the only one whose count grows, and the innocent jobs that shared
its batch complete. An offset found in ``max_attempts`` unreleased sessions goes to the
DLQ as ``too_many_attempts`` with that history.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

from spotbatch.storage import ObjectStore, join_uri

__all__ = ["AttemptLedger", "Session"]

_MAX_SESSIONS = 64  # per partition: enough history for any sane max_attempts


@dataclass
class Session:
    """One owner's time holding a partition: the offsets it took up, as [first, last] ranges."""

    owner: str
    at: str
    ranges: list[list[int]] = field(default_factory=list)
    released: bool = False

    def covers(self, offset: int) -> bool:
        return any(first <= offset <= last for first, last in self.ranges)

    def add(self, offsets: list[int]) -> None:
        for offset in sorted(offsets):  # a partition's offsets mostly come in order: ranges stay few
            for r in reversed(self.ranges):
                if r[0] - 1 <= offset <= r[1] + 1:
                    r[0], r[1] = min(r[0], offset), max(r[1], offset)
                    break
            else:
                self.ranges.append([offset, offset])

    def trim(self, below: int) -> None:
        """Forget offsets under ``below`` (committed: they never come back)."""
        self.ranges = [[max(first, below), last] for first, last in self.ranges if last >= below]


class AttemptLedger:
    """Per-partition sessions, loaded at assignment and written once per turn (I/O pool)."""

    def __init__(self, store: ObjectStore, root_uri: str, owner: str, max_attempts: int) -> None:
        self._store, self._root, self._owner, self.max_attempts = store, root_uri, owner, max_attempts
        self._earlier: dict[tuple[str, int], list[Session]] = {}  # other sessions, as loaded
        self._mine: dict[tuple[str, int], Session] = {}
        self._lock = threading.Lock()  # the owner edits while the I/O pool serialises

    def load(self, topic: str, partition: int, committed: int | None) -> None:
        """Read a newly assigned partition's ledger (I/O); a new session of ours starts."""
        uri = self._uri(topic, partition)
        sessions = _parse(self._store.read_bytes(uri)) if self._store.exists(uri) else []
        for session in sessions:
            session.trim(committed or 0)
        with self._lock:
            self._earlier[(topic, partition)] = [s for s in sessions if s.ranges][-_MAX_SESSIONS:]
            self._mine[(topic, partition)] = Session(self._owner, _now())

    def forget(self, topic: str, partition: int) -> None:
        with self._lock:
            self._earlier.pop((topic, partition), None)
            self._mine.pop((topic, partition), None)

    def prior(self, topic: str, partition: int, offset: int) -> list[Session]:
        """Earlier unreleased sessions that took ``offset`` up and did not finish it."""
        with self._lock:
            return [s for s in self._earlier.get((topic, partition), []) if not s.released and s.covers(offset)]

    def ever_taken(self, topic: str, partition: int, offset: int) -> bool:
        """Whether any session (released or not, ours too) took ``offset`` up: if none
        did, no output of it can exist yet, and looking for one is wasted I/O."""
        with self._lock:
            sessions = [*self._earlier.get((topic, partition), []), self._mine.get((topic, partition))]
            return any(s is not None and s.covers(offset) for s in sessions)

    def take_up(self, topic: str, partition: int, offsets: list[int]) -> bool:
        """Note offsets this session starts (memory); False if the partition is not ours."""
        with self._lock:
            mine = self._mine.get((topic, partition))
            if mine is None:
                return False
            mine.add(offsets)
            return True

    def save(self, topic: str, partition: int, committed: int | None = None) -> None:
        """Write the partition's ledger (I/O pool): earlier sessions and ours."""
        with self._lock:
            mine = self._mine.get((topic, partition))
            if mine is None:
                return
            if committed is not None:
                mine.trim(committed)
            sessions = [*self._earlier.get((topic, partition), []), mine]
            data = json.dumps({"version": 1, "sessions": [s.__dict__ for s in sessions]}).encode()
        # No fsync: the ledger counts process deaths, which keep the page cache; a lost
        # node takes a local ledger with it anyway (put checkpoints on S3 for that).
        self._store.write_atomic(self._uri(topic, partition), data, sync=False)

    def release(self, topic: str, partition: int) -> None:
        """Our session ended by a drain or a revoke, not by a job's fault (I/O)."""
        with self._lock:
            mine = self._mine.get((topic, partition))
            if mine is None or not mine.ranges:
                return
            mine.released = True
        self.save(topic, partition)

    def history(self, sessions: list[Session]) -> str:
        return "; ".join(f"{s.at} {s.owner}" for s in sessions[-self.max_attempts:])

    def _uri(self, topic: str, partition: int) -> str:
        return join_uri(self._root, f"{topic}/{partition}.json")


def _parse(data: bytes) -> list[Session]:
    """A ledger written by any version of us; an unreadable one is started afresh (it is
    a breaker, not a record of truth: losing it costs a poison job a few more restarts)."""
    try:
        doc = json.loads(data)
        return [Session(str(s["owner"]), str(s["at"]), [[int(a), int(b)] for a, b in s["ranges"]],
                        bool(s.get("released"))) for s in doc["sessions"]]
    except (ValueError, KeyError, TypeError):
        return []


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
