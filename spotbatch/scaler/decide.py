"""The pure scale decision: lag and running workers in, the next replica target out.

``decide(state, observation, policy)`` turns what the broker says (lag, unconsumed
records) and how many workers run into the next replica target; no clocks, no I/O. The
replica math is KEDA + HPA's (``spotbatch.scaler.policy``); on top of it sit the HPA's
scale-in stabilisation window, KEDA's cooldown before zero, and invariant 5: never zero
while a record is unconsumed. The local autoscaler (``spotbatch.scaler.local``) and the
scheduling simulator (``spotbatch.scheduler.simulate``) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spotbatch.scaler import policy as keda  # the one place for KEDA + HPA replica math

__all__ = ["ScalePolicy", "Observation", "ScaleState", "Decision", "decide"]

Action = Literal["hold", "scale_out", "scale_in", "scale_to_zero", "replace"]


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
