"""Spot replicas by zone, for the simulator: where they run, and what each zone takes back.

Replicas are counted per zone (a ``ReplicaPool`` each), never one by one. Two placements:

- ``spread`` (what the existing policies do; SkyServe-style spreading, Kubernetes
  topology spread): the spot target is split evenly over the zones and each zone's share
  stays there. A share a dark zone cannot hold waits, unready, until the zone comes
  back; that shortfall is what the dynamic fallback reacts to.
- ``zone-aware``: replicas keep running where they are (moving costs a cold start), new
  ones go to the zones with the highest recent availability first, scale-in removes
  from the worst zones first, and a zone going dark has its replicas relaunched at once
  wherever capacity is. "Recent availability" is the zone's mean capacity over the last
  ``score_window_s``, relative to its full size: what launch attempts there would have seen.

Without traces there is one zone whose capacity is the synthetic market's ``spot_capacity``.
"""

from __future__ import annotations

import numpy as np

from spotbatch.scheduler.spot_traces import ZoneCapacity

__all__ = ["ReplicaPool", "SpotZones", "PLACEMENTS"]

PLACEMENTS = ("spread", "zone-aware")
_RANK_EVERY = 10  # steps


class ReplicaPool:
    """Replica counts of one pool: ready, and starting in a ring indexed by ready step."""

    def __init__(self, cold_steps: int) -> None:
        self.ready = 0
        self.cold_steps = cold_steps
        self.ring = [0] * (cold_steps + 1)
        self.starting = 0

    @property
    def alive(self) -> int:
        return self.ready + self.starting

    def advance(self, i: int) -> None:
        slot = i % len(self.ring)
        self.ready += self.ring[slot]
        self.starting -= self.ring[slot]
        self.ring[slot] = 0

    def launch(self, i: int, n: int) -> None:
        if self.cold_steps == 0:
            self.ready += n
            return
        self.ring[(i + self.cold_steps) % len(self.ring)] += n
        self.starting += n

    def remove(self, i: int, n: int) -> int:
        """Remove ``n`` replicas, newest starting ones first; returns ready ones removed."""
        for back in range(self.cold_steps, 0, -1):
            if n == 0 or self.starting == 0:
                break
            slot = (i + back) % len(self.ring)
            take = min(n, self.ring[slot])
            self.ring[slot] -= take
            self.starting -= take
            n -= take
        take = min(n, self.ready)
        self.ready -= take
        return take

    def converge(self, i: int, target: int, *, can_launch: bool, limit: int | None) -> None:
        if self.alive > target:
            self.remove(i, self.alive - target)
        elif self.alive < target and can_launch:
            room = target - self.alive if limit is None else min(target, limit) - self.alive
            if room > 0:
                self.launch(i, room)


class SpotZones:
    """The spot pool as zones. ``capacity`` None: one zone capped at ``limit``."""

    def __init__(self, cold_steps: int, *, capacity: ZoneCapacity | None, limit: int | None, placement: str,
                 score_window_steps: int) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; pick one of {', '.join(PLACEMENTS)}")
        n = capacity.zones if capacity is not None else 1
        self.pools = [ReplicaPool(cold_steps) for _ in range(n)]
        self.limit, self.aware = limit, placement == "zone-aware" and n > 1
        # per step, a list over zones: indexing Python lists beats numpy in the step loop
        self.caps = capacity.caps.T.tolist() if capacity is not None else None
        self.kill = capacity.kill.T.tolist() if capacity is not None and capacity.kill is not None else None
        self.order = list(range(n))
        if self.aware and capacity is not None:  # aware needs n > 1, so capacity is set
            full = np.maximum(1, np.asarray(capacity.replicas_per_zone, dtype=float))[:, None]
            self._cum = np.hstack([np.zeros((n, 1)), np.cumsum(capacity.caps / full, axis=1)])
            self._window = max(1, score_window_steps)

    @property
    def ready(self) -> int:
        return sum(p.ready for p in self.pools)

    @property
    def starting(self) -> int:
        return sum(p.starting for p in self.pools)

    @property
    def alive(self) -> int:
        return sum(p.ready + p.starting for p in self.pools)

    def capacity_at(self, i: int) -> int | None:
        return sum(self.caps[i]) if self.caps is not None else self.limit

    def advance(self, i: int) -> None:
        for p in self.pools:
            p.advance(i)

    def rank(self, i: int) -> None:
        """Zone-aware: re-order zones by availability over the window ending at step i.
        Every ``_RANK_EVERY`` steps: an hours-long window barely moves in one step, and a
        zone going dark is handled at once by its capacity, not by the ranking."""
        if not self.aware or i % _RANK_EVERY:
            return
        lo = max(0, i + 1 - self._window)
        score = (self._cum[:, i + 1] - self._cum[:, lo]) / (i + 1 - lo)
        self.order = sorted(range(len(self.pools)), key=lambda z: -score[z])  # stable: ties keep file order

    def reclaim(self, i: int) -> tuple[int, int]:
        """The traces' losses at step i: (ready replicas lost, all replicas lost)."""
        if self.caps is None:
            return 0, 0
        caps, kill = self.caps[i], self.kill[i] if self.kill is not None else None
        lost_ready = lost = 0
        for z, pool in enumerate(self.pools):
            alive = pool.ready + pool.starting
            n = alive - caps[z]
            if kill is not None and kill[z] > 0:
                n = max(n, round(alive * kill[z]))
            if n > 0:
                lost_ready += pool.remove(i, n)
                lost += n
        return lost_ready, lost

    def converge(self, i: int, target: int, *, can_launch: bool) -> None:
        if self.caps is None:
            self.pools[0].converge(i, target, can_launch=can_launch, limit=self.limit)
            return
        caps = self.caps[i]
        targets = self._aware_targets(target, caps) if self.aware else self._spread_targets(target)
        for z, pool in enumerate(self.pools):
            pool.converge(i, targets[z], can_launch=can_launch, limit=caps[z])

    def _spread_targets(self, target: int) -> list[int]:
        n = len(self.pools)
        share, extra = divmod(target, n)
        return [share + (z < extra) for z in range(n)]

    def _aware_targets(self, target: int, caps: list[int]) -> list[int]:
        out = [0] * len(self.pools)
        left = target
        for z in self.order:  # keep what runs (best zones first: scale-in trims the worst)
            keep = min(self.pools[z].alive, caps[z], left)
            out[z], left = keep, left - keep
        for z in self.order:  # then fill the best zones' spare capacity
            if left <= 0:
                break
            add = min(caps[z] - out[z], left)
            if add > 0:
                out[z], left = out[z] + add, left - add
        return out
