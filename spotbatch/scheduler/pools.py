"""The pool policy: how many replicas run on-demand and how many on spot.

Pure: no clock, no I/O. The live splitter (splitter.py) and the simulator (simulate.py)
call the same ``decide``; the caller keeps the returned ``FallbackMemory`` and passes it
back on the next call.

The split, for ``desired`` total replicas (the lag -> replicas policy's answer):

1. ``baseline`` on-demand replicas always run (AWS OnDemandBaseCapacity, SkyServe
   base_ondemand_fallback_replicas), even when ``desired`` is lower.
2. Of the rest, ``on_demand_above_base_pct`` percent (rounded up) run on-demand, like
   AWS OnDemandPercentageAboveBaseCapacity; the remainder runs on spot, up to ``spot_max``.
3. Dynamic fallback (SkyServe dynamic_ondemand_fallback): when the spot pool has had
   fewer ready replicas than it asked for for longer than ``unready_grace_s``, or spot
   replicas are interrupted faster than ``interruption_rate_max_per_h``, extra
   on-demand replicas cover the gap, up to ``fallback_cap``. Spot stays requested so it
   can recover. Hysteresis: while fallback is on, its size never shrinks below what it
   covered (except when the spot target itself shrinks); it is handed back only after
   spot has been fully ready, at an interruption rate under the limit, for ``recover_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

__all__ = [
    "PoolConfig", "PoolObservation", "FallbackMemory", "Split", "decide", "base_split",
    "config_from_metadata", "config_to_metadata", "METADATA_KEYS",
]


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """One hybrid setting. Defaults: 1 on-demand replica under a spot burst, no fallback."""

    baseline: int = 1
    on_demand_above_base_pct: float = 0.0
    spot_max: int = 100
    fallback_cap: int = 0
    unready_grace_s: float = 300.0  # longer than a cold start, or every scale-up falls back
    interruption_rate_max_per_h: float = 0.1  # per spot replica; 5-10 %/month is ~1e-4
    recover_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("baseline", "spot_max", "fallback_cap"):
            if getattr(self, name) < 0:
                raise ValueError(f"pool setting {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.on_demand_above_base_pct <= 100:
            raise ValueError(f"pool setting on_demand_above_base_pct must be in 0..100, got {self.on_demand_above_base_pct}")
        for name in ("unready_grace_s", "interruption_rate_max_per_h", "recover_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"pool setting {name} must be >= 0, got {getattr(self, name)}")

    def max_replicas(self, max_total: int) -> dict[str, int]:
        """Each pool's maxReplicaCount when the lag policy asks for at most ``max_total``."""
        above = max(0, max_total - self.baseline)
        od_above = math.ceil(above * self.on_demand_above_base_pct / 100)
        spot = min(self.spot_max, above - od_above)
        return {"on-demand": self.baseline + od_above + min(self.fallback_cap, spot), "spot": spot}


@dataclass(frozen=True, kw_only=True)
class PoolObservation:
    """What the spot pool looks like now: replicas it asked for, replicas ready, and
    interruptions per spot replica-hour over a recent window."""

    spot_requested: int
    spot_ready: int
    interruption_rate_per_h: float = 0.0


@dataclass(frozen=True)
class FallbackMemory:
    """The policy's state between calls (times in the caller's clock, seconds)."""

    unready_since_s: float | None = None  # spot short of its request since
    healthy_since_s: float | None = None  # spot fully ready and calm since (while fallback is on)
    fallback: int = 0  # extra on-demand replicas now covering spot
    active: bool = False


@dataclass(frozen=True)
class Split:
    on_demand: int  # baseline + share above base + fallback
    spot: int
    fallback: int
    reason: str  # why fallback is on or off (for logs and the simulator's trace)

    def for_pool(self, pool: str) -> int:
        if pool == "spot":
            return self.spot
        if pool == "on-demand":
            return self.on_demand
        raise ValueError(f"unknown pool {pool!r}; expected 'spot' or 'on-demand'")


def base_split(desired: int, config: PoolConfig) -> tuple[int, int]:
    """(on-demand, spot) before any fallback."""
    above = max(0, desired - config.baseline)
    od_above = math.ceil(above * config.on_demand_above_base_pct / 100)
    return config.baseline + od_above, min(config.spot_max, above - od_above)


def decide(desired: int, observed: PoolObservation, now_s: float, config: PoolConfig,
           memory: FallbackMemory = FallbackMemory()) -> tuple[Split, FallbackMemory]:
    """The split for ``desired`` replicas now, and the memory for the next call."""
    on_demand, spot = base_split(desired, config)
    short = observed.spot_ready < observed.spot_requested
    unready_since = (memory.unready_since_s if memory.unready_since_s is not None else now_s) if short else None
    stormy = observed.interruption_rate_per_h > config.interruption_rate_max_per_h
    stuck = unready_since is not None and now_s - unready_since >= config.unready_grace_s
    gap = spot if stormy else max(0, min(spot, observed.spot_requested) - observed.spot_ready)

    if config.fallback_cap == 0:
        return Split(on_demand, spot, 0, "fallback off (cap 0)"), FallbackMemory(unready_since_s=unready_since)
    if not memory.active:
        if not (stuck or stormy):
            return Split(on_demand, spot, 0, "spot healthy"), FallbackMemory(unready_since_s=unready_since)
        fallback = min(config.fallback_cap, spot, gap)
        why = "interruption rate over limit" if stormy else f"spot unready > {config.unready_grace_s:g}s"
        return (Split(on_demand + fallback, spot, fallback, f"fallback on: {why}"),
                FallbackMemory(unready_since_s=unready_since, fallback=fallback, active=True))
    return _while_active(on_demand, spot, gap, short or stormy, now_s, config, replace(memory, unready_since_s=unready_since))


def _while_active(on_demand: int, spot: int, gap: int, troubled: bool, now_s: float,
                  config: PoolConfig, memory: FallbackMemory) -> tuple[Split, FallbackMemory]:
    # Ratchet up to the gap, never below what already covers (no flapping), never above
    # the spot target (when demand falls, fallback falls with it).
    fallback = min(config.fallback_cap, spot, max(memory.fallback, gap))
    if troubled:
        return (Split(on_demand + fallback, spot, fallback, "fallback on: spot still short"),
                replace(memory, healthy_since_s=None, fallback=fallback))
    healthy_since = memory.healthy_since_s if memory.healthy_since_s is not None else now_s
    if now_s - healthy_since >= config.recover_s:
        return Split(on_demand, spot, 0, "fallback handed back: spot recovered"), FallbackMemory()
    return (Split(on_demand + fallback, spot, fallback, "fallback on: spot recovering"),
            replace(memory, healthy_since_s=healthy_since, fallback=fallback))


# ScaledObject trigger metadata (KEDA passes strings) <-> PoolConfig. `apply` writes these
# keys; the splitter reads them. One table, so the two cannot drift apart.
METADATA_KEYS: dict[str, str] = {
    "baseline": "baseline",
    "on_demand_above_base_pct": "onDemandAboveBasePercent",
    "spot_max": "spotMax",
    "fallback_cap": "fallbackCap",
    "unready_grace_s": "unreadyGraceSeconds",
    "interruption_rate_max_per_h": "interruptionRateMaxPerHour",
    "recover_s": "recoverSeconds",
}
_INT_FIELDS = {"baseline", "spot_max", "fallback_cap"}


def config_from_metadata(metadata: Mapping[str, str]) -> PoolConfig:
    """A PoolConfig from trigger metadata; missing keys take the defaults. ValueError
    (naming the key) on a value that is not a number."""
    values: dict[str, Any] = {}
    for field, key in METADATA_KEYS.items():
        if key not in metadata:
            continue
        raw = str(metadata[key]).strip()
        try:
            values[field] = int(raw) if field in _INT_FIELDS else float(raw)
        except ValueError:
            kind = "an integer" if field in _INT_FIELDS else "a number"
            raise ValueError(f"scaler metadata {key}={raw!r} is not {kind}; fix the ScaledObject trigger") from None
    return PoolConfig(**values)


def config_to_metadata(config: PoolConfig) -> dict[str, str]:
    """Trigger metadata strings for ``config`` (numbers printed without noise)."""
    return {key: _num(getattr(config, field)) for field, key in METADATA_KEYS.items()}


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
