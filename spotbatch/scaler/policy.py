"""Lag -> replicas, exactly as KEDA + the HPA compute it, and the work mode.

Pure functions, no I/O. Two steps, as in a cluster:

1. The metric. ``lag`` mode: the capped total lag (lag.compute_lag), target
   ``lagThreshold``. ``work`` mode: pending rows, target = the rows one replica drains
   in ``drain_s`` (its learned rows/s x drain seconds), capped at the partition count
   like lag (more consumers than partitions sit idle). Either way the HPA wants
   ceil(metric / target) replicas: ``work_replicas`` is ceil(pending rows / (rows/s per
   replica x drain seconds)).
2. The replicas (``keda_replicas``): KEDA scales 0 <-> 1 by activation (to 0 only
   once the cooldown has passed); the HPA, from 1 up, applies its 10% tolerance
   against the current replicas and clamps to [max(minReplicaCount, 1), maxReplicaCount].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "HPA_TOLERANCE",
    "DEFAULT_MAX_REPLICAS",
    "ReplicaBounds",
    "Metric",
    "hpa_replicas",
    "keda_replicas",
    "lag_metric",
    "work_metric",
    "work_replicas",
]

HPA_TOLERANCE = 0.1  # kube-controller-manager --horizontal-pod-autoscaler-tolerance
DEFAULT_MAX_REPLICAS = 100  # ScaledObject maxReplicaCount default


@dataclass(frozen=True, kw_only=True)
class ReplicaBounds:
    """A ScaledObject's minReplicaCount / maxReplicaCount (KEDA defaults 0 / 100)."""

    min_replicas: int = 0
    max_replicas: int = DEFAULT_MAX_REPLICAS

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= max(min_replicas, 1)")

    @property
    def hpa_min(self) -> int:
        return max(self.min_replicas, 1)  # the HPA never goes below 1; KEDA owns 0


@dataclass(frozen=True)
class Metric:
    """What the scaler serves: the HPA wants ceil(value / target) replicas."""

    value: float
    target: float
    active: bool


def hpa_replicas(metric: float, target: float, current: int | None, bounds: ReplicaBounds,
                 *, tolerance: float = HPA_TOLERANCE) -> int:
    """The HPA's answer for an External AverageValue metric.

    ``current`` None: the steady state (no tolerance band). Within the tolerance
    (|1 - metric / (target x current)| <= 10%) the HPA keeps ``current``.
    """
    if target <= 0:
        raise ValueError(f"target must be > 0, got {target}")
    if current:
        ratio = metric / (target * current)
        if abs(1.0 - ratio) <= tolerance:
            return _clamp(current, bounds)
    return _clamp(math.ceil(metric / target), bounds)


def keda_replicas(metric: Metric, current: int | None, bounds: ReplicaBounds, *,
                  cooldown_elapsed: bool = True, tolerance: float = HPA_TOLERANCE) -> int:
    """Where KEDA + HPA take a scale target on one poll.

    Inactive: 0 when minReplicaCount is 0 and the cooldown has passed (KEDA scales to
    zero), else the HPA's answer. Active from 0: KEDA's step to max(min, 1); the HPA
    takes it from there on the next poll. ``current`` None: the steady-state answer.
    """
    if not metric.active and bounds.min_replicas == 0:
        if current is None or current == 0 or cooldown_elapsed:
            return 0
    if current == 0:
        return bounds.hpa_min if metric.active else bounds.min_replicas
    return hpa_replicas(metric.value, metric.target, current, bounds, tolerance=tolerance)


def lag_metric(total_lag: int, active: bool, lag_threshold: int) -> Metric:
    """lag mode: the capped total lag against lagThreshold (lag.LagResult)."""
    return Metric(value=float(total_lag), target=float(lag_threshold), active=active)


def work_metric(pending_rows: int, *, rows_per_s_per_replica: float, drain_s: float,
                partition_count: int, lag_active: bool, allow_idle_consumers: bool = False) -> Metric:
    """work mode: pending rows against the rows one replica drains in ``drain_s``.

    Active while any row is pending or the lag says so (scale-to-zero never strands
    work: a record whose rows are unknown still shows as lag). Capped at the partition
    count unless idle consumers are allowed.
    """
    if rows_per_s_per_replica <= 0 or drain_s <= 0:
        raise ValueError(f"rows/s per replica ({rows_per_s_per_replica}) and drain seconds ({drain_s}) must be > 0")
    target = rows_per_s_per_replica * drain_s
    value = float(max(pending_rows, 0))
    if not allow_idle_consumers and math.ceil(value / target) > partition_count:
        value = partition_count * target
    return Metric(value=value, target=target, active=lag_active or pending_rows > 0)


def work_replicas(pending_rows: int, *, rows_per_s_per_replica: float, drain_s: float) -> int:
    """ceil(pending rows / (rows/s per replica x drain seconds)), uncapped."""
    if rows_per_s_per_replica <= 0 or drain_s <= 0:
        raise ValueError(f"rows/s per replica ({rows_per_s_per_replica}) and drain seconds ({drain_s}) must be > 0")
    return math.ceil(max(pending_rows, 0) / (rows_per_s_per_replica * drain_s))


def _clamp(replicas: int, bounds: ReplicaBounds) -> int:
    return min(max(replicas, bounds.hpa_min), bounds.max_replicas)
