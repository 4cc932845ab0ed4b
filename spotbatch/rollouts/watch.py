"""A running worker's view of the registry: the models topic re-read every few seconds.

The topic is compacted and small (a record per version, alias and rollout), so reading
it whole from the start is cheap and needs no offset bookkeeping; a change reaches a
running fleet within ``every_s`` with no restart. A read that fails keeps the last good
state (the worker goes on serving what it serves) and is retried on the next tick.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from spotbatch.rollouts.records import RegistryState

__all__ = ["RegistryWatch"]

log = logging.getLogger(__name__)


class RegistryWatch:
    def __init__(self, read: Callable[[], RegistryState], *, every_s: float = 2.0) -> None:
        self._read = read  # Registry.state, or a fake in unit tests
        self.every_s = every_s
        self._state = RegistryState()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.generation = 0  # bumped on every read that changed something

    def start(self) -> "RegistryWatch":
        """Read once now (a failure raises: a worker must not start blind), then tail."""
        self._refresh(raise_errors=True)
        self._thread = threading.Thread(target=self._loop, name="registry-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def state(self) -> RegistryState:
        with self._lock:
            return self._state

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._refresh(raise_errors=False)

    def _refresh(self, *, raise_errors: bool) -> None:
        try:
            state = self._read()
        except Exception as exc:  # noqa: BLE001 - keep serving the last good state
            if raise_errors:
                raise
            log.warning("could not re-read the model registry (%s); keeping the last state", exc)
            return
        with self._lock:
            if state != self._state:
                self._state = state
                self.generation += 1
