"""Fault hook points of the worker loop; tests install what happens there.

The worker calls ``reached(point)`` at each named point. In the product nothing is
installed and the call returns at once; a test installs a hook (``install``), e.g.
``spotbatch.testing.faults.KillAt``, a real SIGKILL the n-th time a point is reached
(in a worker subprocess, through the test shim tests/chaos/shim/sitecustomize.py).
Points:

- ``after_write``: an output (a job's, or a part's and its checkpoint) is durable; its
  offset is not committed yet.
- ``after_commit``: offsets were just committed.
"""

from __future__ import annotations

from typing import Callable, Optional

__all__ = ["reached", "install", "POINTS"]

POINTS = ("after_write", "after_commit")

Hook = Callable[[str], None]
_hook: Optional[Hook] = None


def install(hook: Optional[Hook]) -> Optional[Hook]:
    """Call ``hook(point)`` at every point from now on (None: nothing); returns the
    hook it replaces, so a test can put it back."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def reached(point: str) -> None:
    hook = _hook
    if hook is not None:
        hook(point)
