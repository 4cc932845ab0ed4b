"""Fault hooks for tests, installed with ``spotbatch.chaos.install``.

``KillAt("after_write", 3)`` kills the process with a real SIGKILL the 3rd time the
worker reaches ``after_write``; ``KillAt.parse("after_write:3")`` reads the same from
text (the chaos shim reads it from ``SPOTBATCH_CHAOS`` in a worker subprocess).
"""

from __future__ import annotations

import os
import signal
import threading

from spotbatch.chaos import POINTS

__all__ = ["KillAt"]


class KillAt:
    """SIGKILL this process the ``n``-th time ``point`` is reached."""

    def __init__(self, point: str, n: int) -> None:
        if point not in POINTS or n < 1:
            raise ValueError(f"kill plan {point}:{n}: use <point>:<n> with point in {POINTS} and n >= 1")
        self.point, self.n = point, n
        self._seen = 0
        self._lock = threading.Lock()  # points are reached on the owner and the I/O threads

    @classmethod
    def parse(cls, spec: str) -> KillAt:
        point, _, count = spec.partition(":")
        if not count.isdigit():
            raise ValueError(f"kill plan {spec!r}: use <point>:<n> with point in {POINTS} and n >= 1")
        return cls(point, int(count))

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        with self._lock:
            self._seen += 1
            due = self._seen >= self.n
        if due:
            os.kill(os.getpid(), signal.SIGKILL)
