"""Plan: search baselines and fallback caps with the simulator; recommend the cheapest
setting that meets the drain SLO on every seed tried.

"Meets the SLO": on each seed, at most ``max_miss_fraction`` of the jobs wait longer
than ``slo_drain_s`` to drain (jobs still waiting at the end count once older than it). A
setting is judged on its worst seed, so one lucky run cannot recommend it. Its cost is
the mean over the seeds.

``plan_json`` is what ``spotbatch scheduler plan --json`` prints and what ``apply
--plan`` reads: ``recommended`` holds the PoolConfig fields plus ``max_replicas`` and the
``lag_threshold`` simulated (the setting holds for that lagThreshold only).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

from spotbatch.scheduler.pools import PoolConfig
from spotbatch.scheduler.prices import InstancePrice
from spotbatch.scheduler.simulate import Policy, SimConfig, SimResult, SpotMarket, simulate
from spotbatch.scheduler.traces import Trace

__all__ = ["Evaluated", "Plan", "PlanError", "default_grid", "search", "plan_json", "setting_from_plan", "plan_table", "PLAN_KIND"]

PLAN_KIND = "spotbatch.plan"


class PlanError(ValueError):
    """A plan file apply cannot use; one line with the fix."""


@dataclass(frozen=True)
class Evaluated:
    pools: PoolConfig
    results: tuple[SimResult, ...]  # one per seed
    meets: bool

    @property
    def cost(self) -> float:
        return sum(r.cost for r in self.results) / len(self.results)

    @property
    def worst_miss_fraction(self) -> float:
        return max(r.miss_fraction for r in self.results)

    @property
    def worst_drain_p95_s(self) -> float:
        return max(r.drain_p95_s for r in self.results)


@dataclass(frozen=True)
class Plan:
    recommended: Evaluated | None
    ranked: tuple[Evaluated, ...]  # meeting the SLO first, each group by cost
    reference: Evaluated  # all on-demand, for the savings
    slo_drain_s: float
    max_miss_fraction: float
    seeds: tuple[int, ...]
    max_replicas: int
    lag_threshold: int  # the lagThreshold simulated; apply writes it with the setting


def default_grid(max_replicas: int) -> tuple[list[int], list[int]]:
    """Baselines 0, 1, 2, 4, ... up to half the max; caps 0 and 1/8, 1/4, 1/2, all of it."""
    baselines, b = [0], 1
    while b <= max(1, max_replicas // 2):
        baselines.append(b)
        b *= 2
    caps = sorted({0, *(max(1, max_replicas * k // 8) for k in (1, 2, 4, 8))})
    return baselines, caps


def search(trace: Trace, *, sim: SimConfig, market: SpotMarket, price: InstancePrice, seeds: Sequence[int],
           slo_drain_s: float, max_miss_fraction: float = 0.001, baselines: Sequence[int] | None = None,
           fallback_caps: Sequence[int] | None = None, template: PoolConfig = PoolConfig(), jobs: int = 1,
           progress: Callable[[int, int], None] | None = None) -> Plan:
    """Simulate every (baseline, cap) on every seed and rank them."""
    if not seeds:
        raise ValueError("plan needs at least one seed")
    sim = replace(sim, slo_drain_s=slo_drain_s)
    grid_b, grid_c = default_grid(sim.max_replicas)
    settings = [replace(template, baseline=b, fallback_cap=c, spot_max=min(template.spot_max, sim.max_replicas))
                for b in (baselines if baselines is not None else grid_b)
                for c in (fallback_caps if fallback_caps is not None else grid_c)]
    reference = PoolConfig(baseline=0, on_demand_above_base_pct=100, spot_max=0)
    tasks = [(pools, seed) for pools in [reference, *settings] for seed in seeds]
    results = _run_all(tasks, trace, sim, market, price, jobs, progress)
    by_setting: dict[PoolConfig, list[SimResult]] = {}
    for (pools, _), result in zip(tasks, results):
        by_setting.setdefault(pools, []).append(result)
    judged = {p: Evaluated(p, tuple(rs), all(_meets(r, max_miss_fraction) for r in rs))
              for p, rs in by_setting.items()}
    ranked = tuple(sorted((judged[p] for p in settings if p in judged),
                          key=lambda e: (not e.meets, e.cost, e.pools.baseline + e.pools.fallback_cap)))
    best = ranked[0] if ranked and ranked[0].meets else None
    return Plan(recommended=best, ranked=ranked, reference=judged[reference], slo_drain_s=slo_drain_s,
                max_miss_fraction=max_miss_fraction, seeds=tuple(seeds), max_replicas=sim.max_replicas,
                lag_threshold=sim.lag_threshold)


def _meets(result: SimResult, max_miss_fraction: float) -> bool:
    # jobs still waiting at the end count as misses once older than the SLO (simulate)
    return result.miss_fraction <= max_miss_fraction


_shared: dict = {}


def _init(trace: Trace, sim: SimConfig, market: SpotMarket, price: InstancePrice) -> None:
    _shared.update(trace=trace, sim=sim, market=market, price=price)  # once per worker process, not per task


def _one(task: tuple[PoolConfig, int]) -> SimResult:
    pools, seed = task
    return simulate(_shared["trace"], Policy("candidate", pools), sim=_shared["sim"], market=_shared["market"],
                    price=_shared["price"], seed=seed)


def _run_all(tasks, trace, sim, market, price, jobs, progress) -> list[SimResult]:
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    out: list[SimResult] = []
    if jobs == 1:
        _init(trace, sim, market, price)
        for task in tasks:
            out.append(_one(task))
            if progress:
                progress(len(out), len(tasks))
        return out
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init, initargs=(trace, sim, market, price)) as pool:
        for result in pool.map(_one, tasks, chunksize=1):
            out.append(result)
            if progress:
                progress(len(out), len(tasks))
    return out


def plan_json(plan: Plan, *, runners_up: int = 5) -> dict:
    """The plan as JSON; ``recommended`` is apply's input (PoolConfig fields + max_replicas)."""
    def row(e: Evaluated) -> dict:
        return {**asdict(e.pools), "max_replicas": plan.max_replicas, "lag_threshold": plan.lag_threshold,
                "cost": round(e.cost, 4),
                "cost_vs_all_on_demand": round(e.cost / plan.reference.cost, 4) if plan.reference.cost else None,
                "meets_slo": e.meets, "worst_miss_fraction": e.worst_miss_fraction,
                "worst_drain_p95_s": e.worst_drain_p95_s}
    rest = [e for e in plan.ranked if e is not plan.recommended]
    return {"kind": PLAN_KIND, "v": 1, "slo_drain_s": plan.slo_drain_s, "max_miss_fraction": plan.max_miss_fraction,
            "seeds": list(plan.seeds), "all_on_demand_cost": round(plan.reference.cost, 4),
            "recommended": row(plan.recommended) if plan.recommended else None,
            "runners_up": [row(e) for e in rest[:runners_up]], "candidates": len(plan.ranked),
            "meeting_slo": sum(e.meets for e in plan.ranked)}


def setting_from_plan(doc: object, source: str = "plan") -> tuple[PoolConfig, int, int | None]:
    """(PoolConfig, max total replicas, lagThreshold or None) from ``plan --json`` output."""
    if not isinstance(doc, dict) or doc.get("kind") != PLAN_KIND:
        raise PlanError(f"{source} is not a plan; make one with `spotbatch scheduler plan ... --json > plan.json`")
    rec = doc.get("recommended")
    if not isinstance(rec, dict):
        raise PlanError(f"{source} recommends nothing (no setting met the SLO); relax --slo-drain or raise --max-replicas and plan again")
    fields = {k: rec[k] for k in PoolConfig.__dataclass_fields__ if k in rec}
    try:
        lag = rec.get("lag_threshold")
        return PoolConfig(**fields), int(rec["max_replicas"]), None if lag is None else int(lag)
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"{source}: bad recommended setting ({exc}); regenerate it with `spotbatch scheduler plan --json`") from None


def plan_table(plan: Plan, *, runners_up: int = 5):
    """The recommendation and the runners-up as a rich table."""
    from rich.table import Table

    title = (f"plan: SLO drain {plan.slo_drain_s:g}s for >= {1 - plan.max_miss_fraction:.1%} of jobs on seeds "
             f"{', '.join(map(str, plan.seeds))}; all on-demand costs ${plan.reference.cost:,.2f}")
    view = Table(title=title)
    # Short headers: the table must fit an 80-column terminal (the caption explains them).
    for name in ("", "base", "cap", "spot", "cost $", "vs OD", "miss", "p95 drain", "SLO"):
        view.add_column(name, justify="left" if name == "" else "right")
    shown = ([plan.recommended] if plan.recommended else []) + \
        [e for e in plan.ranked if e is not plan.recommended][:runners_up]
    for e in shown:
        label = "best" if e is plan.recommended else ""
        ratio = f"{e.cost / plan.reference.cost:.1%}" if plan.reference.cost else "-"
        view.add_row(label, str(e.pools.baseline), str(e.pools.fallback_cap), str(e.pools.spot_max), f"{e.cost:,.0f}",
                     ratio, f"{e.worst_miss_fraction:.2%}", f"{e.worst_drain_p95_s:,.0f}s", "met" if e.meets else "MISSED")
    view.caption = ("base: on-demand baseline; cap: on-demand fallback cap above it; spot: spot max; vs OD: "
                    "cost relative to all on-demand; miss, p95 drain: the worst over the seeds")
    if plan.recommended is None:
        view.caption = "no setting met the SLO: relax --slo-drain / --max-miss-fraction or raise --max-replicas"
    return view
