"""A seeded simulation of the hybrid scheduler against a workload trace.

Time moves in fixed steps (``step_s``, 30 s by default). Replicas are counted, not
modelled one by one, so 1,000 replicas cost no more than one: each step does O(1)
Python work plus an O(cold start / step) ring buffer of starting replicas.

Per step:
1. Every ``polling_interval_s``: lag (unfinished jobs, as KEDA counts uncommitted
   records: queued jobs + one in progress per busy replica; partitions are assumed to
   be >= max replicas) -> desired replicas through
   the local autoscaler's ``decide`` (KEDA + HPA replica math from scaler/policy.py,
   KEDA's cooldown before 0, the HPA's scale-in window); then the pool policy (pools.decide, the
   same code the live splitter runs) splits it into on-demand and spot targets.
2. The spot market: pool-wide capacity events (seeded, the same for every policy)
   reclaim a fraction of spot replicas and stop new spot launches for a while
   (correlated bursts + capacity shortage); each spot replica is also interrupted
   independently at ``interruption_rate_per_h``. With recorded spot traces (``zones``,
   spot_traces.py) the spot pool is split into zones instead: each zone's capacity at
   the step reclaims what runs above it, and the synthetic events are off. An
   interrupted busy replica loses, on average, half a checkpoint interval of rows; they
   go back to the backlog.
3. Each pool converges on its target: surplus starting replicas go first, then ready
   ones; new ones launch (spot only while capacity allows, zone by zone as the policy's
   placement says: zones.py) and become ready after ``cold_start_s``. Every launched
   replica is billed, starting or ready.
4. Ready replicas process the backlog at ``rows_per_s`` each.

Drain time of a job = from its arrival until every row that arrived up to then is
done (FIFO over the backlog). A job whose drain time exceeds the SLO is a miss.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from spotbatch.scaler import decide as autoscale  # the scaler's lag -> replicas decision, reused as is
from spotbatch.scheduler.pools import FallbackMemory, PoolConfig, PoolObservation, decide
from spotbatch.scheduler.prices import InstancePrice
from spotbatch.scheduler.spot_traces import ZoneCapacity
from spotbatch.scheduler.traces import Trace
from spotbatch.scheduler.zones import ReplicaPool, SpotZones

__all__ = ["SimConfig", "SpotMarket", "Policy", "SimResult", "Timeline", "simulate", "simulate_timeline", "compare",
           "standard_policies", "zone_aware_policy", "comparison_json", "comparison_table"]

_RATE_WINDOW_S = 3600.0  # interruptions per spot replica-hour are observed over this window


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    rows_per_s: float = 100.0  # per ready replica
    cold_start_s: float = 120.0  # launch -> ready (node + image + model load)
    lag_threshold: int = 10  # jobs per replica (KEDA lagThreshold)
    max_replicas: int = 100  # total, across pools (the lag policy's cap)
    polling_interval_s: float = 30.0
    cooldown_s: float = 300.0  # KEDA cooldownPeriod, and the HPA's scale-in window
    checkpoint_interval_s: float = 300.0
    slo_drain_s: float = 1800.0
    step_s: float = 30.0  # = the polling interval: finer steps buy little and cost time
    zone_score_window_s: float = 6 * 3600.0  # zone-aware placement ranks zones on this much history


@dataclass(frozen=True, kw_only=True)
class SpotMarket:
    """The spot market's behaviour. ``interruption_rate_per_h`` is per replica: a
    monthly rate m (AWS advisor buckets: <5 %, 5-10 %, ...) is about m / 720."""

    interruption_rate_per_h: float = 0.075 / 720
    events_per_day: float = 0.0  # correlated reclaim + shortage events in the pool
    event_kill_fraction: float = 0.5
    shortage_mean_s: float = 3600.0  # no new spot launches for ~Exp(mean) after an event
    spot_capacity: int | None = None  # the most spot replicas the market ever grants


@dataclass(frozen=True)
class Policy:
    name: str
    pools: PoolConfig
    placement: str = "spread"  # over zones: "spread" or "zone-aware" (zones.py)


@dataclass(frozen=True)
class SimResult:
    policy: str
    cost: float
    cost_on_demand: float
    cost_spot: float
    gpu_hours_on_demand: float
    gpu_hours_spot: float
    rows: int
    rows_recomputed: float
    interruptions: int
    jobs: int
    slo_misses: int
    drain_p50_s: float
    drain_p95_s: float
    drain_max_s: float
    fallback_hours: float
    peak_replicas: int
    backlog_rows_at_end: float
    settings: dict = field(default_factory=dict)
    placement: str = "spread"
    zones: int = 1

    @property
    def miss_fraction(self) -> float:
        return self.slo_misses / self.jobs if self.jobs else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "miss_fraction": self.miss_fraction}


def standard_policies(*, baseline: int, fallback_cap: int, spot_max: int) -> list[Policy]:
    """The four policies the issue compares."""
    return [
        Policy("all on-demand", PoolConfig(baseline=0, on_demand_above_base_pct=100, spot_max=0)),
        Policy("all spot", PoolConfig(baseline=0, spot_max=spot_max)),
        Policy(f"baseline {baseline}", PoolConfig(baseline=baseline, spot_max=spot_max)),
        Policy(f"baseline {baseline} + fallback {fallback_cap}",
               PoolConfig(baseline=baseline, spot_max=spot_max, fallback_cap=fallback_cap)),
    ]


def zone_aware_policy(*, baseline: int, fallback_cap: int, spot_max: int) -> Policy:
    """Baseline + fallback with zone-aware spot placement (zones.py)."""
    return Policy(f"zone-aware {baseline} + fallback {fallback_cap}",
                  PoolConfig(baseline=baseline, spot_max=spot_max, fallback_cap=fallback_cap), placement="zone-aware")


def compare(trace: Trace, policies: Iterable[Policy], *, sim: SimConfig, market: SpotMarket,
            price: InstancePrice, seed: int, zones: ZoneCapacity | None = None) -> list[SimResult]:
    """Every policy against the same trace and the same market events (or spot traces)."""
    return [simulate(trace, p, sim=sim, market=market, price=price, seed=seed, zones=zones) for p in policies]


def simulate(trace: Trace, policy: Policy, *, sim: SimConfig, market: SpotMarket, price: InstancePrice,
             seed: int, zones: ZoneCapacity | None = None) -> SimResult:
    """One policy, one seeded run. Same seed, same inputs -> the same result. With
    ``zones`` (recorded spot capacity per zone) the market's capacity events and
    ``spot_capacity`` give way to the traces; its independent interruptions still apply."""
    return _run(trace, policy, sim, market, seed, zones).result(policy, price)


@dataclass(frozen=True)
class Timeline:
    """Per step of one run: spot capacity the market offered (None: unlimited), replicas
    alive per pool and rows waiting at the end of the step."""

    step_s: float
    spot_capacity: np.ndarray | None
    on_demand: np.ndarray
    spot: np.ndarray
    backlog_rows: np.ndarray


def simulate_timeline(trace: Trace, policy: Policy, *, sim: SimConfig, market: SpotMarket, price: InstancePrice,
                      seed: int, zones: ZoneCapacity | None = None) -> tuple[SimResult, Timeline]:
    """``simulate`` plus the run over time (for ``--plot``)."""
    run = _run(trace, policy, sim, market, seed, zones)
    capacity = zones.caps.sum(axis=0) if zones is not None else None
    return run.result(policy, price), Timeline(sim.step_s, capacity, run.od_alive, run.spot_alive, run.backlog)


def _run(trace: Trace, policy: Policy, sim: SimConfig, market: SpotMarket, seed: int,
         zones: ZoneCapacity | None) -> "_Run":
    if abs(trace.step_s - sim.step_s) > 1e-9:
        raise ValueError(f"trace step {trace.step_s}s != simulation step {sim.step_s}s; bin the trace with the same step")
    if zones is not None and zones.caps.shape[1] != trace.steps:
        raise ValueError(f"spot traces cover {zones.caps.shape[1]} steps, the workload {trace.steps}; build both for one window")
    run = _Run(trace, policy, sim, market, seed, zones)
    run.loop()
    return run


class _Run:
    def __init__(self, trace: Trace, policy: Policy, sim: SimConfig, market: SpotMarket, seed: int,
                 zones: ZoneCapacity | None) -> None:
        self.trace, self.pools, self.sim, self.market = trace, policy.pools, sim, market
        dt = sim.step_s
        cold = math.ceil(sim.cold_start_s / dt - 1e-9)
        self.od = ReplicaPool(cold)
        self.spot = SpotZones(cold, capacity=zones, limit=market.spot_capacity, placement=policy.placement,
                              score_window_steps=round(sim.zone_score_window_s / dt))
        self.zones = zones.zones if zones is not None else 1
        self.rng = np.random.default_rng([seed, 1])
        self.events, self.shortage_steps = _market_events(market, trace.steps, dt, seed)
        if zones is not None:  # recorded capacity replaces the synthetic events
            self.events = np.zeros(trace.steps, dtype=bool)
        self.poll_steps = max(1, round(sim.polling_interval_s / dt))
        self.scale_policy = autoscale.ScalePolicy(min_replicas=0, max_replicas=sim.max_replicas,
                                                  lag_threshold=sim.lag_threshold, cooldown_s=sim.cooldown_s)
        self.p_interrupt = -math.expm1(-market.interruption_rate_per_h * dt / 3600)
        self.lost_per_kill = sim.rows_per_s * sim.checkpoint_interval_s / 2
        self.rate_window = max(1, round(_RATE_WINDOW_S / dt))
        self.rows_per_job = trace.rows_per_job  # a property over the whole trace: read once
        n = trace.steps
        self.done = np.zeros(n)
        self.od_alive = np.zeros(n, dtype=np.int64)
        self.spot_alive = np.zeros(n, dtype=np.int64)
        self.fallback = np.zeros(n, dtype=np.int64)
        self.backlog = np.zeros(n)
        self.recomputed = 0.0
        self.interruptions = 0
        self.backlog_end = 0.0
        self.memory = FallbackMemory()
        self.scale_state = autoscale.ScaleState()
        self.shortage_until = -1  # no new spot launches up to this step

    def loop(self) -> None:
        sim, dt, rows_in = self.sim, self.sim.step_s, self.trace.rows
        backlog = busy = 0.0  # rows waiting; replicas busy in the last step
        od_target = spot_target = fallback = 0
        kills = deque([0] * self.rate_window, maxlen=self.rate_window)
        spot_steps = deque([0] * self.rate_window, maxlen=self.rate_window)
        kills_sum = spot_steps_sum = 0
        for i in range(self.trace.steps):
            if i % self.poll_steps == 0:
                self.spot.rank(i)
                spot_h = spot_steps_sum * dt / 3600
                rate = kills_sum / spot_h if spot_h >= 1 else 0.0
                od_target, spot_target, fallback = self._poll(i, backlog, busy, spot_target, rate)
            backlog += rows_in[i]
            killed_ready, killed = self._interrupt(i)
            capacity = sim.rows_per_s * dt * (self.od.ready + self.spot.ready + killed_ready)
            if killed_ready and capacity > 0:
                lost = killed_ready * self.lost_per_kill * min(1.0, backlog / capacity)
                self.recomputed += lost
                backlog += lost
                self.done[i] -= lost
            self.interruptions += killed
            self.od.converge(i, od_target, can_launch=True, limit=None)
            self.spot.converge(i, spot_target, can_launch=i > self.shortage_until)
            self.od.advance(i)
            self.spot.advance(i)
            work = min(backlog, sim.rows_per_s * dt * (self.od.ready + self.spot.ready))
            backlog -= work
            busy = work / (sim.rows_per_s * dt)
            self.done[i] += work
            self.od_alive[i], self.spot_alive[i], self.fallback[i] = self.od.alive, self.spot.alive, fallback
            self.backlog[i] = backlog
            kills_sum += killed - kills[0]
            kills.append(killed)
            spot_steps_sum += self.spot.alive - spot_steps[0]
            spot_steps.append(self.spot.alive)
        self.backlog_end = backlog

    def _poll(self, i: int, backlog: float, busy: float, spot_requested: int, rate_per_h: float) -> tuple[int, int, int]:
        """The scaler's poll: lag -> desired total -> (on-demand, spot, fallback) targets.
        It sees the backlog left at the end of the last step, so the lag -> replicas
        equilibrium (lag = threshold x replicas) does not depend on step_s."""
        # KEDA's lag also counts uncommitted jobs in progress: one per busy replica
        lag = math.ceil(backlog / self.rows_per_job - 1e-9) + math.ceil(busy - 1e-9)
        now_s = i * self.sim.step_s
        self.scale_state, _ = autoscale.decide(self.scale_state, autoscale.Observation(
            at_s=now_s, lag=lag, unconsumed=lag, partitions=self.sim.max_replicas,
            running=self.od.alive + self.spot.alive, active=lag > 0), self.scale_policy)
        observed = PoolObservation(spot_requested=spot_requested, spot_ready=self.spot.ready,
                                   interruption_rate_per_h=rate_per_h)
        split, self.memory = decide(self.scale_state.target, observed, now_s, self.pools, self.memory)
        return split.on_demand, split.spot, split.fallback

    def _interrupt(self, i: int) -> tuple[int, int]:
        """This step's spot losses: (ready replicas lost, all replicas lost). Traced
        zones first (capacity gone, recorded preemptions), then the synthetic market."""
        killed_ready, killed = self.spot.reclaim(i)
        if self.events[i] and self.spot.alive:
            self.shortage_until = max(self.shortage_until, i + int(self.shortage_steps[i]))
        for pool in self.spot.pools:
            if self.events[i] and pool.alive:
                n = int(round(pool.alive * self.market.event_kill_fraction))
                killed_ready += pool.remove(i, n)
                killed += n
            if pool.alive and self.p_interrupt > 0:
                n = int(self.rng.binomial(pool.alive, self.p_interrupt))
                if n:  # an interruption hits ready and starting replicas alike
                    ready_share = int(self.rng.hypergeometric(pool.ready, pool.starting, n))
                    pool.remove(i, n - ready_share)  # newest starting first
                    pool.ready -= ready_share
                    killed_ready += ready_share
                    killed += n
        return killed_ready, killed

    def result(self, policy: Policy, price: InstancePrice) -> SimResult:
        dt, trace = self.sim.step_s, self.trace
        od_h = float(self.od_alive.sum()) * dt / 3600
        spot_h = float(self.spot_alive.sum()) * dt / 3600
        drains, misses = _drain_times(trace, self.done, dt, self.sim.slo_drain_s)
        weights = trace.jobs[trace.jobs > 0]
        p50, p95, pmax = _weighted_quantiles(drains, weights, (0.5, 0.95, 1.0))
        return SimResult(
            policy=policy.name, cost=od_h * price.on_demand_per_h + spot_h * price.spot_per_h,
            cost_on_demand=od_h * price.on_demand_per_h, cost_spot=spot_h * price.spot_per_h,
            gpu_hours_on_demand=od_h * price.gpus, gpu_hours_spot=spot_h * price.gpus,
            rows=int(trace.rows.sum()), rows_recomputed=float(self.recomputed), interruptions=self.interruptions,
            jobs=int(trace.jobs.sum()), slo_misses=misses, drain_p50_s=p50, drain_p95_s=p95, drain_max_s=pmax,
            fallback_hours=float((self.fallback > 0).sum()) * dt / 3600,
            peak_replicas=int((self.od_alive + self.spot_alive).max(initial=0)),
            backlog_rows_at_end=float(self.backlog_end), settings=asdict(policy.pools), placement=policy.placement,
            zones=self.zones)


def _market_events(market: SpotMarket, steps: int, dt: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Capacity events per step and each one's shortage length in steps. Drawn from
    their own seeded stream, so every policy meets the same events."""
    rng = np.random.default_rng([seed, 2])
    p = -math.expm1(-market.events_per_day * dt / 86_400)
    events = rng.random(steps) < p
    shortage = np.ceil(rng.exponential(market.shortage_mean_s, size=steps) / dt).astype(np.int64) if market.shortage_mean_s > 0 \
        else np.zeros(steps, dtype=np.int64)
    return events, shortage


def _drain_times(trace: Trace, done: np.ndarray, dt: float, slo_s: float) -> tuple[np.ndarray, int]:
    """Drain time of the jobs arriving in each step that has arrivals, and SLO misses.
    Jobs not drained by the end count as drained at the end (a lower bound)."""
    arrived = np.cumsum(trace.rows, dtype=float)
    finished = np.maximum.accumulate(np.cumsum(done))
    steps = np.flatnonzero(trace.jobs > 0)
    # tolerance: float sums of many steps must not leave a drained job "not done"
    j = np.searchsorted(finished, arrived[steps] - 1e-6 * np.maximum(1.0, arrived[steps]), side="left")
    drains = (np.minimum(j, trace.steps - 1) - steps + 1) * dt
    misses = int(trace.jobs[steps][drains > slo_s].sum())
    return drains, misses


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: tuple[float, ...]) -> tuple[float, ...]:
    if len(values) == 0:
        return tuple(0.0 for _ in qs)
    order = np.argsort(values, kind="stable")
    v, cw = values[order], np.cumsum(weights[order])
    return tuple(float(v[min(len(v) - 1, np.searchsorted(cw, q * cw[-1], side="left"))]) for q in qs)


def comparison_json(results: list[SimResult], trace: Trace, sim: SimConfig, market: SpotMarket,
                    price: InstancePrice, seed: int) -> dict:
    """``simulate --json``: the scenario and one row per policy (cost also relative to
    the all on-demand policy when it is among them)."""
    reference = next((r.cost for r in results if r.settings.get("on_demand_above_base_pct") == 100
                      and r.settings.get("spot_max") == 0), None)
    rows = [{**r.to_dict(), "cost_vs_all_on_demand": (r.cost / reference) if reference else None} for r in results]
    return {"trace": {"name": trace.name, "days": trace.duration_s / 86_400, "jobs": int(trace.jobs.sum()),
                      "rows": int(trace.rows.sum())},
            "sim": asdict(sim), "market": asdict(market), "price": asdict(price), "seed": seed, "policies": rows}


def comparison_table(results: list[SimResult], *, title: str):
    """A rich table of the policies side by side: one column per policy, so four
    policies fit an 80-column terminal."""
    from rich.table import Table

    reference = next((r.cost for r in results if r.settings.get("on_demand_above_base_pct") == 100
                      and r.settings.get("spot_max") == 0), None)
    view = Table(title=title)
    view.add_column("")
    for r in results:
        view.add_column(r.policy, justify="right")
    rows = {
        "cost $": lambda r: f"{r.cost:,.0f}",
        "vs all on-demand": lambda r: f"{r.cost / reference:.1%}" if reference else "-",
        "GPU-h on-demand": lambda r: f"{r.gpu_hours_on_demand:,.0f}",
        "GPU-h spot": lambda r: f"{r.gpu_hours_spot:,.0f}",
        "interruptions": lambda r: str(r.interruptions),
        "rows recomputed": lambda r: f"{r.rows_recomputed:,.0f}",
        "drain p50": lambda r: _dur(r.drain_p50_s),
        "drain p95": lambda r: _dur(r.drain_p95_s),
        "drain max": lambda r: _dur(r.drain_max_s),
        "SLO misses (jobs)": lambda r: f"{r.slo_misses:,}",
        "SLO miss fraction": lambda r: f"{r.miss_fraction:.3%}",
        "fallback hours": lambda r: f"{r.fallback_hours:,.1f}",
    }
    for name, cell in rows.items():
        view.add_row(name, *(cell(r) for r in results))
    return view


def _dur(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.1f}m" if seconds >= 60 else f"{seconds:.0f}s"
