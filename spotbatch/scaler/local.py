"""The local autoscaler: ``spotbatch worker`` processes between min and max, from lag.

``LocalAutoscaler`` runs the loop: observe (``spotbatch.scaler.backlog``), reap, decide
(``spotbatch.scaler.decide``, pure), apply (``spotbatch.scaler.procs``, the process
pool), and record each scale event (a JSON log line as it happens, and the list for
``--json``). ``run_scale_local`` is ``spotbatch scale-local``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from spotbatch.kafka_security import client_options
from spotbatch.logevents import event_line
from spotbatch.retry import is_transient_kafka
from spotbatch.scaler.backlog import Backlog, GroupBacklog
from spotbatch.scaler.decide import Decision, Observation, ScalePolicy, ScaleState, decide
from spotbatch.scaler.procs import Slot, WorkerCommand, WorkerCrashLoop, WorkerPool

__all__ = ["ScaleEvent", "AutoscalerReport", "LocalAutoscaler", "SCALE_ACTIONS", "run_scale_local", "worker_env"]

log = logging.getLogger("spotbatch.scaler.local")


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
        """One JSON object per event (``spotbatch.logevents``; ``parse_events`` reads it back)."""
        fields: dict[str, Any] = {"from": self.replicas_from, "to": self.replicas_to, "lag": self.lag,
                                  "unconsumed": self.unconsumed, "pids": self.pids}
        if self.returncode is not None:
            fields["rc"] = self.returncode
        if self.reason:
            fields["reason"] = self.reason
        return event_line(self.event, ts=self.at, **fields)


@dataclass
class AutoscalerReport:
    seconds: float
    max_replicas: int
    workers_started: int
    scale_events: list[dict[str, Any]] = field(default_factory=list)
    replicas: list[tuple[float, int]] = field(default_factory=list)  # (t_s, running) at each change

    def to_json(self) -> str:
        return json.dumps(asdict(self))


SCALE_ACTIONS = ("scale_out", "scale_in", "scale_to_zero", "replace")  # the events that change the replica count


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


def worker_env(settings: Any, keys: Iterable[str], *, config: Path | None = None) -> dict[str, str]:
    """The environment that hands ``settings``' values of ``keys`` to a worker: settings as
    configuration (``SPOTBATCH_<KEY>``, which a worker reads above its YAML file), never as
    a rebuilt command line. The rest a worker reads as this process did: from the
    environment it inherits and from ``config`` (``SPOTBATCH_CONFIG``)."""
    env = {f"SPOTBATCH_{key.upper()}": _env_value(getattr(settings, key)) for key in keys}
    if config is not None:
        env["SPOTBATCH_CONFIG"] = str(config)
    return env


def _env_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))  # e.g. SPOTBATCH_INPUT_PREFIXES
    getter = getattr(value, "get_secret_value", None)  # a SecretStr
    return str(getter() if getter else value)


def run_scale_local(settings: Any, *, worker_env: Mapping[str, str], log_dir: Path | None = None,
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
                               lag_threshold=policy.lag_threshold, client_options=client_options(settings))
    except KafkaError:
        raise ValueError(f"cannot reach Kafka at {settings.kafka_bootstrap}; pass --bootstrap HOST:PORT") from None
    finally:
        quiet.setLevel(level)
    pool = WorkerPool(WorkerCommand(env=worker_env, log_dir=log_dir), drain_s=settings.drain_s)
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
