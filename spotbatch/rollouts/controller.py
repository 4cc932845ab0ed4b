"""The rollout controller: move a challenger through traffic steps while its gates hold.

Every bit of state is the rollout record in the models topic (``rollout/<name>``): a
controller object keeps nothing between ticks that it cannot read back, so a restarted
controller (or another replica, or ``spotbatch rollout controller`` after a foreground
``rollout start`` was stopped) continues where the record says. Workers route by the same
record, so a step, a rollback or a promotion takes effect at their next refresh.

One tick:
  1. read the record; nothing to do unless it is ``running``;
  2. read the status and shadow records since the rollout started; fold them (observe);
  3. evaluate the gates; any failing gate rolls back at once, naming the gate;
  4. once the step has baked (``bake_jobs`` challenger jobs, or ``bake_s`` with at least
     one) and every gate passes: the next step, or, after the last, promote (the
     ``champion`` alias moves to the challenger, then the record says ``promoted``);
  5. write the record when something changed (re-reading it first: a record someone
     else moved on since step 1 wins, and this tick's decision is dropped).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from spotbatch.records import results_topic
from spotbatch.rollouts.gates import GateResult, Thresholds, evaluate, verdict
from spotbatch.rollouts.observe import Window, outcomes, read_since, shadows, window
from spotbatch.rollouts.records import Rollout, shadow_topic
from spotbatch.rollouts.registry import Registry, RegistryError

__all__ = ["Controller", "check_steps", "summary"]

log = logging.getLogger(__name__)

# A running rollout's record is rewritten when a gate changes state, and at least this
# often while values move (for `rollout status` readers), not at every tick.
SAVE_EVERY_S = 30.0


def check_steps(steps: Sequence[float]) -> tuple[float, ...]:
    """Fractions in (0, 1], strictly ascending, the last 1.0; RegistryError naming the fix."""
    fixed = tuple(float(s) for s in steps)
    example = "e.g. steps (0.1, 0.5, 1.0), or --steps 10,50,100 on the CLI"
    if not fixed:
        raise RegistryError(f"no steps: give ascending fractions ending at 1.0, {example}")
    if any(not math.isfinite(s) or not 0.0 < s <= 1.0 for s in fixed):
        raise RegistryError(f"steps {list(fixed)}: each must be in (0, 1], {example}")
    if any(b <= a for a, b in zip(fixed, fixed[1:])):
        raise RegistryError(f"steps {list(fixed)} do not ascend: {example}")
    if fixed[-1] != 1.0:
        raise RegistryError(f"steps {list(fixed)} end below 1.0: the last step gives the challenger every job, {example}")
    return fixed


def summary(rollout: Rollout, gates: Sequence[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """What ``rollout status`` shows: the record's fields that matter, plus the gates."""
    return {"name": rollout.name, "state": rollout.state, "champion": rollout.champion,
            "challenger": rollout.challenger, "steps": list(rollout.steps), "step": rollout.step,
            "fraction": rollout.fraction, "shadow": rollout.shadow, "reason": rollout.reason,
            "gates": list(rollout.gates if gates is None else gates), "started_at": rollout.started_at,
            "updated_at": rollout.updated_at, "step_started_at": rollout.step_started_at,
            "bake_jobs": rollout.settings.get("bake_jobs"), "bake_s": rollout.settings.get("bake_s"), **extra}


class Controller:
    """Drives the rollout of one model name. Cheap to create; safe to discard at any time."""

    def __init__(self, bootstrap: str, name: str, jobs_topic: str, models_topic: str = "spotbatch.models", *,
                 client_options: Mapping | None = None, clock: Callable[[], float] = time.time,
                 read_timeout_s: float = 30.0) -> None:
        self.bootstrap, self.name, self.jobs_topic = bootstrap, name, jobs_topic
        self.registry = Registry(bootstrap, models_topic, client_options=client_options)
        self._options = dict(client_options or {})
        self._clock, self._read_timeout_s = clock, read_timeout_s
        self.jobs_in_step = 0  # the challenger's finished jobs in the step, as of the last evaluation

    # ---- the record ------------------------------------------------------------------

    def rollout(self) -> Optional[Rollout]:
        return self.registry.rollout(self.name)

    def running(self) -> Rollout:
        """The running rollout; RegistryError (naming the fix) if there is none."""
        current = self.rollout()
        if current is None or current.state != "running":
            last = f" (last: {current.state}, v{current.champion} -> v{current.challenger})" if current else ""
            raise RegistryError(f"model {self.name!r} has no rollout running{last}; start one: spotbatch rollout "
                                f"start {self.name} --to VERSION")
        return current

    def _save(self, based_on: Rollout, new: Rollout) -> Rollout:
        """Write ``new`` unless the record moved since ``based_on`` was read (step 5)."""
        current = self.rollout()
        if current != based_on:
            log.info("rollout %s changed under this controller; keeping the recorded one", self.name)
            return current or based_on
        self.registry.put_rollout(new)
        return new

    def _now(self) -> float:
        return math.floor(self._clock() * 1000) / 1000  # millisecond, as Kafka stamps records

    # ---- verbs -----------------------------------------------------------------------

    def start(self, to_version: int, *, steps: Sequence[float] = (0.1, 0.5, 1.0), bake_jobs: int = 20,
              bake_s: Optional[float] = None, shadow: float = 0.0, gates: Thresholds | None = None) -> Rollout:
        """Record a running rollout from the current champion to ``to_version`` at step 0."""
        fixed = check_steps(steps)
        if bake_jobs < 1:
            raise RegistryError(f"bad bake_jobs {bake_jobs}: a step bakes on at least 1 challenger job, e.g. 20")
        if bake_s is not None and not (math.isfinite(bake_s) and bake_s >= 0):
            raise RegistryError(f"bad bake_s {bake_s}: give seconds >= 0, e.g. 60")
        if not 0.0 <= shadow <= 1.0:
            raise RegistryError(f"bad shadow {shadow}: a fraction of the champion's jobs in [0, 1], e.g. 0.2")
        thresholds = (gates or Thresholds()).with_min_jobs(bake_jobs)
        state = self.registry.state()
        current = state.rollouts.get(self.name)
        if current is not None and current.state == "running":
            raise RegistryError(f"model {self.name!r} has a rollout running (v{current.champion} -> "
                                f"v{current.challenger}, step {current.step + 1}/{len(current.steps)}); wait for it, "
                                f"or stop it: spotbatch rollout abort {self.name}")
        try:
            champion = state.resolve(self.name).version
            state.resolve(self.name, str(to_version))
        except ValueError as exc:
            raise RegistryError(str(exc)) from None
        if to_version == champion:
            raise RegistryError(f"model {self.name!r} version {to_version} is the champion already; roll out another "
                                f"version (register it: spotbatch models register {self.name} --version N --ref REF)")
        now = self._now()
        rollout = Rollout(name=self.name, champion=champion, challenger=to_version, steps=fixed, shadow=shadow,
                          started_at=now, updated_at=now, step_started_at=now,
                          settings={"bake_jobs": bake_jobs, "bake_s": bake_s, "jobs_topic": self.jobs_topic,
                                    "gates": thresholds.to_json()})
        self.registry.put_rollout(rollout)
        return rollout

    def observe(self, rollout: Rollout) -> Window:
        """Step 2: the stats of the rollout's current step, from the status and shadow topics."""
        since_ms = math.floor(rollout.started_at * 1000)
        read = lambda topic: read_since(self.bootstrap, topic, since_ms, client_options=self._options,  # noqa: E731
                                        timeout_s=self._read_timeout_s)
        seen = outcomes(read(results_topic(self.jobs_topic)), self.name)
        shadowed = shadows(read(shadow_topic(self.jobs_topic)), self.name) if rollout.shadow > 0 else []
        return window(rollout, seen, shadowed)

    def evaluate(self, rollout: Rollout) -> list[GateResult]:
        """Steps 2-3 without a decision: the gates as they stand now (for `rollout status`)."""
        stats = self.observe(rollout)
        self.jobs_in_step = stats.challenger.jobs
        thresholds = Thresholds.from_json(rollout.settings.get("gates", {}))
        return evaluate(stats.challenger, stats.champion, stats.shadow, thresholds, shadowing=rollout.shadow > 0)

    def tick(self) -> Rollout:
        """One pass of the loop (see the module docstring); returns the record as it now stands."""
        rollout = self.rollout()
        if rollout is None or rollout.state != "running":
            if rollout is None:
                raise RegistryError(f"model {self.name!r} has no rollout; start one: spotbatch rollout start "
                                    f"{self.name} --to VERSION")
            return rollout
        results = self.evaluate(rollout)
        gates = [r.to_json() for r in results]
        now = self._now()
        new = dataclasses.replace(rollout, gates=gates, updated_at=now)
        outcome = verdict(results)
        if outcome == "fail":
            failed = next(r for r in results if r.status == "fail")
            new = dataclasses.replace(new, state="rolled_back",
                                      reason=f"gate {failed.name} failed at step {rollout.step + 1}/{len(rollout.steps)} "
                                             f"({rollout.fraction:.0%}): {failed.why}")
        elif outcome == "pass" and self._baked(rollout, now):
            if rollout.step + 1 < len(rollout.steps):
                new = dataclasses.replace(new, step=rollout.step + 1, step_started_at=now, reason="")
            else:
                new = dataclasses.replace(new, state="promoted",
                                          reason=f"every gate held through {len(rollout.steps)} steps")
        elif not self._worth_saving(rollout, new, now):
            return rollout
        if new.state == "promoted":
            if (latest := self.rollout()) != rollout:  # lost the race: do not move the alias
                return latest or rollout
            self.registry.set_alias(self.name, "champion", rollout.challenger)
        saved = self._save(rollout, new)
        if saved is new and (new.state != rollout.state or new.step != rollout.step):
            log.info("rollout %s: %s step %d/%d %s", self.name, new.state, new.step + 1, len(new.steps), new.reason)
        return saved

    def _baked(self, rollout: Rollout, now: float) -> bool:
        bake_jobs = int(rollout.settings.get("bake_jobs", 1))
        bake_s = rollout.settings.get("bake_s")
        if self.jobs_in_step >= bake_jobs:
            return True
        return bake_s is not None and self.jobs_in_step >= 1 and now - rollout.step_started_at >= float(bake_s)

    @staticmethod
    def _worth_saving(old: Rollout, new: Rollout, now: float) -> bool:
        statuses = lambda r: [(g.get("name"), g.get("status")) for g in r.gates]  # noqa: E731
        return statuses(old) != statuses(new) or now - old.updated_at >= SAVE_EVERY_S

    def abort(self, reason: str = "aborted by an operator") -> Rollout:
        """Stop the rollout now: every job goes to the champion again; the alias stays."""
        rollout = self.running()
        new = dataclasses.replace(rollout, state="aborted", reason=reason, updated_at=self._now())
        return self._save(rollout, new)

    def status(self, *, live: bool = False) -> dict[str, Any]:
        """The summary of the rollout; ``live`` evaluates a running one's gates now instead of
        showing the last recorded evaluation."""
        rollout = self.rollout()
        if rollout is None:
            if self.name not in self.registry.state().versions:
                raise RegistryError(f"model {self.name!r} is not in the registry; register it: spotbatch models "
                                    f"register {self.name} --version 1 --ref REF")
            raise RegistryError(f"model {self.name!r} has no rollout; start one: spotbatch rollout start {self.name} "
                                "--to VERSION")
        gates = [g.to_json() for g in self.evaluate(rollout)] if live and rollout.state == "running" else None
        return summary(rollout, gates, jobs_in_step=self.jobs_in_step if gates is not None else None)

    def run(self, *, until_final: bool = True, every_s: float = 1.0,
            on_tick: Optional[Callable[[Rollout], None]] = None, stop: Optional[threading.Event] = None) -> Rollout:
        """Tick every ``every_s`` until the rollout is final (``until_final``) or ``stop`` is set."""
        stop = stop or threading.Event()
        while True:
            rollout = self.tick()
            if on_tick is not None:
                on_tick(rollout)
            if (until_final and rollout.state != "running") or stop.wait(every_s):
                return rollout

    def _settle(self, version: int, *, since_s: float, quiet_s: float, limit_s: float, every_s: float = 1.0) -> None:
        """Wait until ``quiet_s`` pass with no new ok status from ``version`` (at most ``limit_s``)."""
        from spotbatch.records import results_topic
        from spotbatch.rollouts.observe import outcomes, read_since

        deadline, since_ms = time.monotonic() + limit_s, int(since_s * 1000)
        while time.monotonic() < deadline:
            seen = outcomes(read_since(self.bootstrap, results_topic(self.jobs_topic), since_ms,
                                       client_options=self._options, timeout_s=self._read_timeout_s), self.name)
            last = max((o.at_ms for o in seen if o.ok and o.version == version), default=since_ms)
            if self._clock() * 1000 - last >= quiet_s * 1000:
                return
            time.sleep(every_s)

    def repair(self, version: int, *, quiet_s: float = 5.0, limit_s: float = 60.0) -> dict[str, int]:
        """Re-publish every job ``version`` wrote (see :mod:`spotbatch.rollouts.repair`), once
        the workers have stopped writing it: they see a rollback at their next registry
        re-read, and batches already on the model still finish on the old version."""
        from spotbatch.rollouts.repair import repair

        current = self.rollout()
        if current is not None and current.state == "running" and version in (current.challenger, current.champion):
            raise RegistryError(f"model {self.name!r} has a rollout running with version {version}: re-published "
                                f"jobs would route the same way; stop it first: spotbatch rollout abort {self.name}")
        self._settle(version, since_s=current.updated_at if current is not None else 0.0, quiet_s=quiet_s,
                     limit_s=limit_s)
        return repair(self.bootstrap, self.name, version, self.jobs_topic, client_options=self._options,
                      timeout_s=self._read_timeout_s)
