"""The local autoscaler: ``spotbatch worker`` processes between min and max, from lag.

Three pieces, kept apart so the policy can be tested without processes:

* ``decide(state, observation, policy)`` is pure: it turns what the broker says (lag,
  unconsumed records) and how many workers run into the next replica target. The
  replica math is KEDA + HPA's (``spotbatch.scaler.policy``); on top of it sit the HPA's
  scale-in stabilisation window, KEDA's cooldown before zero, and invariant 5: never
  zero while a record is unconsumed.
* ``WorkerPool`` starts, signals and reaps the processes. Scale-in is a stop signal (the
  worker drains, commits and exits, as on SIGTERM); a worker still alive past its drain
  deadline gets SIGKILL. The newest worker goes first, as a ReplicaSet picks the
  youngest pod: it holds the least work. The signal is SIGTERM, as Kubernetes sends on
  a scale-in; the usage ledger counts only cloud notices as spot interruptions
  (``spotbatch.workers.usage.is_interruption``).
* ``LocalAutoscaler`` runs the loop: observe, reap, decide, apply, and record each scale
  event (a structured log line as it happens, and the list for ``--json``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from spotbatch.kafka_admin import OffsetReader
from spotbatch.retry import is_transient_kafka
from spotbatch.scaler.lag import LagOptions, compute_lag, read_offsets
from spotbatch.scaler import policy as keda  # the one place for KEDA + HPA replica math

__all__ = [
    "ScalePolicy",
    "ScaleState",
    "Observation",
    "Decision",
    "decide",
    "Backlog",
    "GroupBacklog",
    "Launcher",
    "WorkerCommand",
    "Slot",
    "WorkerPool",
    "WorkerCrashLoop",
    "ScaleEvent",
    "AutoscalerReport",
    "LocalAutoscaler",
    "run_scale_local",
]

log = logging.getLogger("spotbatch.scaler.local")

Action = Literal["hold", "scale_out", "scale_in", "scale_to_zero", "replace"]


# ---- the pure decision ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ScalePolicy:
    """What the autoscaler aims for. ``cooldown_s`` is both KEDA's cooldownPeriod (no
    unconsumed record for this long before going to zero) and the HPA's scale-in
    stabilisation window (scale in to the highest replica count wanted within it)."""

    min_replicas: int = 0
    max_replicas: int = 4
    lag_threshold: int = 10
    cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"replicas must satisfy 0 <= min <= max and max >= 1 (got min {self.min_replicas}, "
                             f"max {self.max_replicas}); pass --min/--max accordingly")
        if self.lag_threshold < 1:
            raise ValueError(f"lag threshold must be >= 1 (got {self.lag_threshold}); pass --lag-threshold N")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown must be >= 0 s (got {self.cooldown_s}); pass --cooldown-s SECONDS")


@dataclass(frozen=True)
class Observation:
    """One look at the group: ``lag`` is KEDA's metric lag (capped) and ``active`` its
    activation; ``unconsumed`` the records not yet committed (log end - committed, a
    partition without a commit counting its whole log: the workers read from the
    earliest offset)."""

    at_s: float  # monotonic clock
    lag: int
    unconsumed: int
    partitions: int
    running: int  # live workers, not counting those draining after a stop signal
    active: bool = False


@dataclass(frozen=True)
class ScaleState:
    target: int = 0
    idle_since_s: float | None = None  # first observation of the current idle stretch
    recent: tuple[tuple[float, int], ...] = ()  # (at_s, wanted) within the stabilisation window


@dataclass(frozen=True)
class Decision:
    action: Action
    target: int
    start: int = 0  # processes to start now
    stop: int = 0  # processes to send the stop signal now
    reason: str = ""


def decide(state: ScaleState, obs: Observation, policy: ScalePolicy) -> tuple[ScaleState, Decision]:
    """Next state and what to do about it; no clocks, no I/O."""
    pending = obs.active or obs.unconsumed > 0  # invariant 5: any unconsumed record keeps us active
    idle_since = None if pending else (state.idle_since_s if state.idle_since_s is not None else obs.at_s)
    cooled = idle_since is not None and obs.at_s - idle_since >= policy.cooldown_s
    metric = keda.lag_metric(obs.lag, pending, policy.lag_threshold)
    bounds = keda.ReplicaBounds(min_replicas=policy.min_replicas, max_replicas=policy.max_replicas)
    wanted = keda.keda_replicas(metric, state.target, bounds, cooldown_elapsed=cooled)
    recent = tuple((t, w) for t, w in state.recent if obs.at_s - t < policy.cooldown_s) + ((obs.at_s, wanted),)
    if cooled or wanted >= state.target:  # KEDA, not the HPA, takes a scaled object to zero
        target = wanted
    else:  # the HPA's scale-in stabilisation: the highest wanted within the window
        target = max(w for _, w in recent)
    if not pending and obs.running < target:
        target = max(policy.min_replicas, obs.running)  # one left on its own, nothing pending: let it go
    if pending:
        target = max(target, 1)  # invariant 5, spelled out: the rules above already give >= 1
    new = ScaleState(target=target, idle_since_s=idle_since, recent=recent)
    return new, _action(state.target, target, obs, pending)


def _action(before: int, target: int, obs: Observation, pending: bool) -> Decision:
    delta = target - obs.running
    if delta > 0:
        kind: Action = "scale_out" if target > before else "replace"
        why = "backlog" if pending else "min replicas"
        return Decision(kind, target, start=delta, reason=f"{why}: lag {obs.lag}, unconsumed {obs.unconsumed}")
    if delta < 0:
        kind = "scale_to_zero" if target == 0 else "scale_in"
        return Decision(kind, target, stop=-delta, reason=f"lag {obs.lag}, unconsumed {obs.unconsumed}")
    return Decision("hold", target)


# ---- worker processes ----------------------------------------------------------------


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
        for slot in self.stopping:
            if not slot.killed and now - slot.stop_sent_s >= self._kill_after_s and slot.proc.poll() is None:
                log.warning("worker %d (pid %d) still draining after %.0fs; SIGKILL", slot.index, slot.pid,
                            now - slot.stop_sent_s)
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


# ---- the loop --------------------------------------------------------------------


@dataclass(frozen=True)
class Backlog:
    """What an observer reads from the broker for one poll."""

    lag: int  # KEDA's metric lag (capped as KEDA caps it)
    unconsumed: Mapping[int, int]  # partition -> records not yet committed
    partitions: int
    active: bool = False  # KEDA's activation


class GroupBacklog:
    """The observer: a consumer group's backlog on one topic, measured by
    ``spotbatch.scaler.lag`` over one long-lived offset reader.

    Lag uses offsetResetPolicy ``earliest``, as the workers do (``auto_offset_reset``):
    a partition without a commit counts its whole log, which is what is unconsumed.
    """

    def __init__(self, bootstrap: str, group: str, topic: str, *, lag_threshold: int, reader: Any = None) -> None:
        self._group, self._topic = group, topic
        self._options = LagOptions(lag_threshold=lag_threshold, offset_reset_policy="earliest")
        self._reader = reader or OffsetReader(bootstrap)

    def __call__(self) -> Backlog:
        committed, ends = read_offsets(self._reader, self._group, self._topic)
        result = compute_lag(committed, ends, self._options)
        return Backlog(lag=result.total_lag, partitions=result.partition_count, active=result.active,
                       unconsumed={p.partition: p.lag_with_persistent for p in result.partitions})

    def close(self) -> None:
        self._reader.close()


@dataclass
class ScaleEvent:
    at: float  # epoch seconds
    t_s: float  # seconds since the autoscaler started
    event: str  # a Decision action, "exited" / "killed", or "shutdown" (the autoscaler stops)
    replicas_from: int
    replicas_to: int
    lag: int
    unconsumed: int
    unconsumed_by_partition: dict[int, int]
    pids: list[int]
    workers: list[int]  # pool indexes (the demo's and --log-dir's worker-<n>.log)
    reason: str = ""
    returncode: int | None = None

    def line(self) -> str:
        """logfmt: one greppable line per event."""
        pairs = {"event": self.event, "from": self.replicas_from, "to": self.replicas_to, "lag": self.lag,
                 "unconsumed": self.unconsumed, "pids": ",".join(map(str, self.pids)) or "-"}
        if self.returncode is not None:
            pairs["rc"] = self.returncode
        text = " ".join(f"{k}={v}" for k, v in pairs.items())
        return f"{text} reason={json.dumps(self.reason)}" if self.reason else text


@dataclass
class AutoscalerReport:
    seconds: float
    max_replicas: int
    workers_started: int
    scale_events: list[dict[str, Any]] = field(default_factory=list)
    replicas: list[tuple[float, int]] = field(default_factory=list)  # (t_s, running) at each change

    def to_json(self) -> str:
        return json.dumps(asdict(self))


_SCALE_ACTIONS = ("scale_out", "scale_in", "scale_to_zero", "replace")


class LocalAutoscaler:
    """observe -> reap -> decide -> apply, once per ``step()``; ``run`` loops it."""

    def __init__(self, *, observe: Callable[[], Backlog], pool: WorkerPool, policy: ScalePolicy,
                 poll_s: float = 1.0, early_exit_s: float = 30.0, max_early_exits: int = 5,
                 on_event: Callable[[ScaleEvent], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.policy, self.pool, self.poll_s = policy, pool, poll_s
        self._observe, self._clock, self._wall = observe, clock, wall
        self._early_exit_s, self._max_early_exits = early_exit_s, max_early_exits
        self._early_exits = 0  # consecutive unrequested non-zero exits soon after start
        self._on_event = on_event or (lambda e: log.info("%s", e.line()))
        self._t0 = clock()
        self.state = ScaleState(target=0)
        self.events: list[ScaleEvent] = []
        self.replicas: list[tuple[float, int]] = [(0.0, 0)]
        self.max_replicas = 0
        self.last: Backlog | None = None

    # -- one poll --

    def step(self) -> Decision:
        try:
            backlog = self._observe()
        except Exception as exc:  # noqa: BLE001 - filtered just below
            if not is_transient_kafka(exc):
                raise
            log.warning("cannot read the group's lag (%s); holding %d replicas until the next poll",
                        exc, self.state.target)
            self._note_exits(self.pool.reap(), self.last or Backlog(0, {}, 0))
            return Decision("hold", self.state.target, reason="lag unavailable")
        self.last = backlog
        self._note_exits(self.pool.reap(), backlog)
        obs = Observation(self._clock(), backlog.lag, sum(backlog.unconsumed.values()), backlog.partitions,
                          len(self.pool.running), backlog.active)
        before = self.state.target
        self.state, decision = decide(self.state, obs, self.policy)
        if decision.start:
            slots = self.pool.start(decision.start)
            self._record(decision.action, before, decision.target, backlog, slots, decision.reason)
        elif decision.stop:
            slots = self.pool.stop_newest(decision.stop)
            self._record(decision.action, before, decision.target, backlog, slots, decision.reason)
        self._note_replicas()
        return decision

    def done(self) -> bool:
        """Burst mode: nothing unconsumed for the whole cooldown, and every worker gone."""
        s = self.state
        cooled = s.idle_since_s is not None and self._clock() - s.idle_since_s >= self.policy.cooldown_s
        return cooled and s.target == self.policy.min_replicas and not self.pool.stopping and \
            len(self.pool.running) == s.target

    # -- the loop --

    def run(self, *, once: bool = False, stop: threading.Event | None = None) -> AutoscalerReport:
        """Poll until ``stop`` is set (or, with ``once``, until ``done()``); then stop every
        worker gracefully and return the report."""
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                started = self._clock()
                self.step()
                if once and self.done():
                    break
                stop.wait(max(0.0, self.poll_s - (self._clock() - started)))
        finally:
            self.close()
        return self.report()

    def close(self) -> None:
        """Stop every worker: the stop signal, wait for the drain, SIGKILL past its deadline."""
        running, backlog = self.pool.running, self.last or Backlog(0, {}, 0)
        if running:
            self._record("shutdown", self.state.target, 0, backlog, running, "autoscaler stopping")
        self._note_exits(self.pool.close(), backlog)
        self.state = replace(self.state, target=0)
        self._note_replicas()

    def report(self) -> AutoscalerReport:
        return AutoscalerReport(seconds=round(self._clock() - self._t0, 3), max_replicas=self.max_replicas,
                                workers_started=self.pool.started,
                                scale_events=[asdict(e) for e in self.events], replicas=list(self.replicas))

    # -- helpers --

    def _note_exits(self, gone: list[Slot], backlog: Backlog) -> None:
        for slot in gone:
            asked = slot.stop_sent_s is not None
            kind = "killed" if slot.killed else "exited"
            why = "after the stop signal" if asked else "on its own"
            self._record(kind, self.state.target, self.state.target, backlog, [slot], why, slot.returncode)
            if asked or slot.returncode == 0 or self._clock() - slot.started_s >= self._early_exit_s:
                self._early_exits = 0
                continue
            self._early_exits += 1
            if self._early_exits >= self._max_early_exits:
                raise WorkerCrashLoop(f"{self._early_exits} workers in a row exited with an error within "
                                      f"{self._early_exit_s:.0f}s of starting (last rc {slot.returncode}); "
                                      "check the worker flags and logs")

    def _record(self, event: str, before: int, after: int, backlog: Backlog, slots: list[Slot], reason: str,
                returncode: int | None = None) -> None:
        e = ScaleEvent(at=round(self._wall(), 3), t_s=round(self._clock() - self._t0, 3), event=event,
                       replicas_from=before, replicas_to=after, lag=backlog.lag,
                       unconsumed=sum(backlog.unconsumed.values()),
                       unconsumed_by_partition=dict(backlog.unconsumed), pids=[s.pid for s in slots],
                       workers=[s.index for s in slots],
                       reason=reason, returncode=returncode)
        self.events.append(e)
        self._on_event(e)

    def _note_replicas(self) -> None:
        n = len(self.pool.running)
        self.max_replicas = max(self.max_replicas, n)
        if n != self.replicas[-1][1]:
            self.replicas.append((round(self._clock() - self._t0, 3), n))


# ---- the command -------------------------------------------------------------------


def run_scale_local(settings: Any, *, worker_args: Sequence[str], log_dir: Path | None = None,
                    once: bool = False) -> AutoscalerReport:
    """``spotbatch scale-local``: the loop in this (main) thread until Ctrl-C/SIGTERM, or
    with ``once`` until the backlog is done. The first signal stops every worker
    gracefully; a second makes draining workers abandon their in-flight work."""
    from kafka.errors import KafkaError

    policy = ScalePolicy(min_replicas=settings.scale_min_replicas, max_replicas=settings.scale_max_replicas,
                         lag_threshold=settings.scale_lag_threshold, cooldown_s=settings.scale_cooldown_s)
    quiet, level = logging.getLogger("kafka"), logging.getLogger("kafka").level
    quiet.setLevel(logging.CRITICAL)  # an unreachable broker: the one-line error below says it all
    try:
        observe = GroupBacklog(settings.kafka_bootstrap, settings.group, settings.topic,
                               lag_threshold=policy.lag_threshold)
    except KafkaError:
        raise ValueError(f"cannot reach Kafka at {settings.kafka_bootstrap}; pass --bootstrap HOST:PORT") from None
    finally:
        quiet.setLevel(level)
    pool = WorkerPool(WorkerCommand(args=worker_args, log_dir=log_dir), drain_s=settings.drain_s)
    scaler = LocalAutoscaler(observe=observe, pool=pool, policy=policy, poll_s=settings.scale_poll_s)
    stop = threading.Event()
    log.info("scale-local: topic=%s group=%s replicas %d..%d lag_threshold=%d cooldown_s=%g",
             settings.topic, settings.group, policy.min_replicas, policy.max_replicas, policy.lag_threshold,
             policy.cooldown_s)

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            log.warning("second %s: workers abandon in-flight work now", signal.Signals(signum).name)
            pool.hurry()
            return
        log.info("%s: stopping every worker (drain up to %gs)", signal.Signals(signum).name, settings.drain_s)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return scaler.run(once=once, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        observe.close()
