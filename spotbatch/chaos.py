"""Fault injection for chaos tests: a real SIGKILL at a named point of the worker loop.

Set ``SPOTBATCH_CHAOS=<point>:<n>`` (e.g. ``after_write:3``) and the worker kills
itself with SIGKILL the n-th time it reaches ``<point>``. Points:

- ``after_write``: an output (a job's, or a part's and its checkpoint) is durable; its
  offset is not committed yet.
- ``after_commit``: offsets were just committed.

Unset (the default), every call is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["reached", "POINTS"]

POINTS = ("after_write", "after_commit")


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"SPOTBATCH_CHAOS={spec!r}: use <point>:<n> with point in {POINTS} and n >= 1")
    return point, int(count)


_PLAN = _parse(os.environ.get("SPOTBATCH_CHAOS", ""))
_seen: dict[str, int] = {}
_lock = threading.Lock()  # points are reached on the owner and the I/O threads


def reached(point: str) -> None:
    if _PLAN is None or _PLAN[0] != point:
        return
    with _lock:
        _seen[point] = _seen.get(point, 0) + 1
        due = _seen[point] >= _PLAN[1]
    if due:
        os.kill(os.getpid(), signal.SIGKILL)
