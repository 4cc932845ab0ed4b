"""The worker's usage meter: what this worker cost, as records for the usage ledger.

The worker's owner loop ticks the meter; every ``interval_s`` it emits one record
covering the time since the previous one, and ``close`` emits the last (``final``).
Records of one worker tile its life without overlap, so a reader sums them; each has
a ``record_id`` (``<worker>-<seq>``) so a redelivered record is counted once.
The record's fields are ``spotbatch.records.UsageRecord`` (emitted as its wire dict,
``v`` included); a stop counts as an interruption by its ``StopCause``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from spotbatch.records import RECORD_VERSION, StopCause, UsageRecord

__all__ = ["UsageMeter", "USAGE_VERSION", "anchored_clock", "is_interruption"]

USAGE_VERSION = RECORD_VERSION


def is_interruption(reason: str) -> bool:
    """Whether a worker stop with this reason counts as a spot interruption: a cloud
    notice does; a signal, a scale-in or the end of a burst run does not (StopCause)."""
    return StopCause.of(reason).interruption


def anchored_clock() -> Callable[[], float]:
    """Epoch seconds that never go backwards: wall time at start plus monotonic time
    since, so consecutive records of a worker cannot overlap after an NTP step."""
    wall0, mono0 = time.time(), time.monotonic()
    return lambda: wall0 + (time.monotonic() - mono0)


class UsageMeter:
    """Counts one worker's usage and emits a record per interval (not thread-safe
    except ``add_busy``/``add_rows``, which any thread may call)."""

    def __init__(self, *, worker_id: str, pool: str, instance_type: str, gpus: int, interval_s: float,
                 emit: Callable[[dict[str, Any]], Any], clock: Callable[[], float] | None = None) -> None:
        if interval_s <= 0:
            raise ValueError("usage interval_s must be > 0")
        self._who = {"worker": worker_id, "pool": pool, "instance_type": instance_type, "gpus": gpus}
        self._interval_s = interval_s
        self._emit = emit
        self._clock = clock or anchored_clock()
        self._lock = threading.Lock()
        self._seq = 0
        self._start = self._clock()
        self._busy_s = 0.0  # may run ahead of the interval: a batch can straddle two
        self._counts = {"rows": 0, "jobs": 0, "interruptions": 0, "rows_recomputed": 0}
        self._closed = False

    def add_busy(self, seconds: float, *, rows: int = 0) -> None:
        """A batch ran for ``seconds`` and inferred ``rows``."""
        with self._lock:
            self._busy_s += max(0.0, seconds)
            self._counts["rows"] += rows

    def add_job(self) -> None:
        with self._lock:
            self._counts["jobs"] += 1

    def add_stop(self, *, reason: str, rows_recomputed: int) -> None:
        """The worker stops before finishing its work; ``rows_recomputed`` inferred rows
        will be redone elsewhere. One interruption if ``is_interruption(reason)``."""
        with self._lock:
            self._counts["interruptions"] += int(is_interruption(reason))
            self._counts["rows_recomputed"] += rows_recomputed

    def tick(self) -> dict[str, Any] | None:
        """Emit a record if an interval has passed since the last one; returns it."""
        if self._closed or self._clock() - self._start < self._interval_s:
            return None
        return self._record(final=False)

    def close(self) -> dict[str, Any] | None:
        """Emit the final record (once); later calls return None."""
        if self._closed:
            return None
        self._closed = True
        return self._record(final=True)

    def _record(self, *, final: bool) -> dict[str, Any]:
        end = max(self._start, self._clock())
        alive = end - self._start
        with self._lock:
            busy = min(self._busy_s, alive)  # the rest carries into the next interval
            self._busy_s -= busy
            counts, self._counts = self._counts, dict.fromkeys(self._counts, 0)
        # Validated here, once, by the schema every reader uses; emitted as its wire dict.
        record = UsageRecord.model_validate({
            "record_id": f"{self._who['worker']}-{self._seq}", **self._who, "start": self._start, "end": end,
            "seconds_alive": alive, "seconds_busy": busy, **counts, "final": final, "at": end,
        }).model_dump(by_alias=True)
        self._seq += 1
        self._start = end
        self._emit(record)
        return record
