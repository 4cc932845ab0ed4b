"""The worker process pool: start, signal and reap ``spotbatch worker`` processes.

Scale-in is a stop signal (the worker drains, commits and exits, as on SIGTERM); a
worker still alive past its drain deadline gets SIGKILL. The newest worker goes first,
as a ReplicaSet picks the youngest pod: it holds the least work. The signal is SIGTERM,
as Kubernetes sends on a scale-in; the usage ledger counts only cloud notices as spot
interruptions (``spotbatch.workers.usage.is_interruption``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["Launcher", "WorkerCommand", "Slot", "WorkerPool", "WorkerCrashLoop"]

log = logging.getLogger(__name__)


class Launcher(Protocol):
    """Starts the index-th worker; ``release`` runs once that process has exited."""

    def start(self, index: int) -> subprocess.Popen: ...

    def release(self, index: int) -> None: ...


@dataclass(frozen=True, kw_only=True)
class WorkerCommand:
    """``python -m spotbatch worker ARGS``; logs to ``log_dir/worker-<i>.log`` or our stderr.

    Each worker gets its own session, so a terminal's Ctrl-C reaches only the
    autoscaler, which forwards one stop signal (a second would make a worker abandon its
    in-flight work)."""

    args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    log_dir: Path | None = None

    def start(self, index: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "spotbatch", "worker", *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        if self.log_dir is None:
            return subprocess.Popen(cmd, env=env, start_new_session=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"worker-{index}.log", "ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def release(self, index: int) -> None:
        pass


@dataclass
class Slot:
    index: int
    proc: subprocess.Popen
    started_s: float
    stop_sent_s: float | None = None
    killed: bool = False
    returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class WorkerPool:
    """Worker processes: start, stop the newest, SIGKILL past the drain deadline, reap."""

    def __init__(self, launcher: Launcher, *, drain_s: float, kill_grace_s: float = 5.0,
                 stop_signal: int = signal.SIGTERM, clock: Callable[[], float] = time.monotonic) -> None:
        self._launcher = launcher
        self._stop_signal = stop_signal
        self._kill_after_s = drain_s + kill_grace_s  # the worker's own deadline, plus exit time
        self._clock = clock
        self._slots: list[Slot] = []
        self._started = 0

    @property
    def running(self) -> list[Slot]:
        return [s for s in self._slots if s.stop_sent_s is None]

    @property
    def started(self) -> int:
        """Processes started so far."""
        return self._started

    @property
    def stopping(self) -> list[Slot]:
        return [s for s in self._slots if s.stop_sent_s is not None]

    def start(self, n: int) -> list[Slot]:
        new = []
        for _ in range(n):
            new.append(Slot(self._started, self._launcher.start(self._started), self._clock()))
            self._started += 1
        self._slots.extend(new)
        return new

    def stop_newest(self, n: int) -> list[Slot]:
        victims = sorted(self.running, key=lambda s: s.index, reverse=True)[:n]
        for slot in victims:
            self._terminate(slot)
        return victims

    def reap(self) -> list[Slot]:
        """Slots whose process exited since the last call; kills drains past the deadline."""
        now = self._clock()
        for slot in self._slots:
            sent_s = slot.stop_sent_s
            if sent_s is None:  # not stopping
                continue
            if not slot.killed and now - sent_s >= self._kill_after_s and slot.proc.poll() is None:
                log.warning("worker %d (pid %d) still draining after %.0fs; SIGKILL", slot.index, slot.pid,
                            now - sent_s)
                slot.proc.kill()
                slot.killed = True
        gone = []
        for slot in list(self._slots):
            rc = slot.proc.poll()
            if rc is None:
                continue
            slot.returncode = rc
            self._slots.remove(slot)
            self._launcher.release(slot.index)
            gone.append(slot)
        return gone

    def close(self, *, poll_s: float = 0.1) -> list[Slot]:
        """Stop every worker and wait for all (SIGKILL past the drain deadline)."""
        for slot in self.running:
            self._terminate(slot)
        gone = self.reap()
        while self._slots:
            time.sleep(poll_s)
            gone += self.reap()
        return gone

    def hurry(self) -> None:
        """A second stop signal to every draining worker: it abandons in-flight work at
        once (redelivered later, never lost)."""
        for slot in self.stopping:
            if slot.proc.poll() is None:
                slot.proc.send_signal(self._stop_signal)

    def _terminate(self, slot: Slot) -> None:
        slot.stop_sent_s = self._clock()
        if slot.proc.poll() is None:
            slot.proc.send_signal(self._stop_signal)


class WorkerCrashLoop(RuntimeError):
    """Workers keep dying soon after they start: a bad flag, model or broker address."""
