"""The planner's view of spot traces: several windows of the same zones.

A setting must meet the SLO on every window (say days 0-30 and 15-45 of a 45-day
trace), as it must on every seed. "The best k zones" are the k with the highest mean
availability over those windows (never over data the planner was not given), so a
plan for 3 zones names which 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from spotbatch.scheduler.spot_traces import SpotTrace, ZoneCapacity, zone_capacity

__all__ = ["SpotWindows", "spot_windows"]


@dataclass(eq=False)
class SpotWindows:
    full: tuple[ZoneCapacity, ...]  # one per window, zones best first
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        return len(self.full)

    @property
    def zones(self) -> int:
        return self.full[0].zones

    @property
    def names(self) -> tuple[str, ...]:
        return self.full[0].names

    def capacity(self, window: int, zones: int | None) -> ZoneCapacity:
        """Window ``window`` with the best ``zones`` zones (None: all)."""
        k = self.zones if zones is None else zones
        key = (window, k)
        if key not in self._cache:
            self._cache[key] = self.full[window] if k == self.zones else self.full[window].subset(range(k))
        return self._cache[key]

    def describe(self) -> tuple[str, ...]:
        return tuple(w.describe() for w in self.full)

    def __getstate__(self) -> dict:  # worker processes rebuild their own cache
        return {"full": self.full, "_cache": {}}


def spot_windows(traces: Sequence[SpotTrace], *, starts_s: Sequence[float], steps: int, step_s: float, fit: str,
                 replicas_per_zone: int | None, max_replicas: int) -> SpotWindows:
    """One ZoneCapacity per start, with the zones ranked on all of them together."""
    full = [zone_capacity(traces, steps=steps, step_s=step_s, start_s=s, fit=fit, replicas_per_zone=replicas_per_zone,
                          max_replicas=max_replicas) for s in starts_s]
    score = np.mean([w.availability() for w in full], axis=0)
    order = sorted(range(len(traces)), key=lambda z: -score[z])
    return SpotWindows(tuple(w.subset(order) for w in full))
