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

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

from spotbatch.scheduler.pools import PoolConfig
from spotbatch.scheduler.prices import InstancePrice
from spotbatch.scheduler.simulate import Policy, SimConfig, SimResult, SpotMarket, simulate
from spotbatch.scheduler.spot_windows import SpotWindows
from spotbatch.scheduler.traces import Trace
from spotbatch.scheduler.zones import PLACEMENTS

__all__ = ["Candidate", "Evaluated", "Plan", "PlanError", "default_grid", "default_zone_counts", "search", "plan_json", "setting_from_plan", "plan_table", "PLAN_KIND",
           "margin"]

PLAN_KIND = "spotbatch.plan"


class PlanError(ValueError):
    """A plan file apply cannot use; one line with the fix."""


@dataclass(frozen=True)
class Candidate:
    """One setting the planner tries: the pool keys, and with spot traces the placement
    over zones and how many zones (the best ``zones`` on the planning windows)."""

    pools: PoolConfig
    placement: str = "spread"
    zones: int | None = None  # None: no spot traces (one synthetic market)


@dataclass(frozen=True)
class Evaluated:
    pools: PoolConfig
    results: tuple[SimResult, ...]  # one per (window, seed)
    meets: bool
    placement: str = "spread"
    zones: tuple[str, ...] = ()  # the zones used, with spot traces

    @property
    def cost(self) -> float:
        return sum(r.cost for r in self.results) / len(self.results)

    @property
    def worst_miss_fraction(self) -> float:
        return max(r.miss_fraction for r in self.results)

    @property
    def worst_drain_p95_s(self) -> float:
        return max(r.drain_p95_s for r in self.results)

    @property
    def fallback_hours(self) -> float:
        return sum(r.fallback_hours for r in self.results) / len(self.results)


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
    windows: tuple[str, ...] = ()  # with spot traces: how each trace window was read


def default_grid(max_replicas: int) -> tuple[list[int], list[int]]:
    """Baselines 0, 1, 2, 4, ... up to half the max; caps 0 and 1/8, 1/4, 1/2, all of it."""
    baselines, b = [0], 1
    while b <= max(1, max_replicas // 2):
        baselines.append(b)
        b *= 2
    caps = sorted({0, *(max(1, max_replicas * k // 8) for k in (1, 2, 4, 8))})
    return baselines, caps


def default_zone_counts(zones: int) -> list[int]:
    """1, a third, two thirds and all of the zones given."""
    return sorted({1, math.ceil(zones / 3), math.ceil(2 * zones / 3), zones})


def search(trace: Trace, *, sim: SimConfig, market: SpotMarket, price: InstancePrice, seeds: Sequence[int],
           slo_drain_s: float, max_miss_fraction: float = 0.001, baselines: Sequence[int] | None = None,
           fallback_caps: Sequence[int] | None = None, template: PoolConfig | None = None, jobs: int = 1,
           progress: Callable[[int, int], None] | None = None, windows: SpotWindows | None = None,
           zone_counts: Sequence[int] | None = None, placements: Sequence[str] = PLACEMENTS) -> Plan:
    """Simulate every candidate on every seed (and every spot trace window) and rank them."""
    if not seeds:
        raise ValueError("plan needs at least one seed")
    sim = replace(sim, slo_drain_s=slo_drain_s)
    grid_b, grid_c = default_grid(sim.max_replicas)
    template = template or PoolConfig()
    settings = [replace(template, baseline=b, fallback_cap=c, spot_max=min(template.spot_max, sim.max_replicas))
                for b in (baselines if baselines is not None else grid_b)
                for c in (fallback_caps if fallback_caps is not None else grid_c)]
    reference = Candidate(PoolConfig(baseline=0, on_demand_above_base_pct=100, spot_max=0))
    if windows is None:
        candidates = [Candidate(p) for p in settings]
        shown: tuple[tuple[str, ...], ...] = ((),)
    else:
        counts = sorted({min(max(1, k), windows.zones) for k in (zone_counts or default_zone_counts(windows.zones))})
        candidates = [Candidate(p, placement, k) for k in counts for placement in placements for p in settings]
        reference = replace(reference, zones=windows.zones)
        shown = tuple(windows.names[:k] for k in range(windows.zones + 1))
    n_windows = windows.count if windows is not None else 1
    tasks = [(c, seed, w) for c in [reference, *candidates] for w in range(n_windows) for seed in seeds]
    results = _run_all(tasks, trace, sim, market, price, windows, jobs, progress)
    by_candidate: dict[Candidate, list[SimResult]] = {}
    for (c, _, _), result in zip(tasks, results):
        by_candidate.setdefault(c, []).append(result)
    judged = {c: Evaluated(c.pools, tuple(rs), all(_meets(r, max_miss_fraction) for r in rs), c.placement,
                           shown[c.zones] if c.zones is not None else ())
              for c, rs in by_candidate.items()}
    ranked = tuple(sorted((judged[c] for c in candidates if c in judged),
                          key=lambda e: (not e.meets, e.cost, e.pools.baseline + e.pools.fallback_cap, len(e.zones))))
    best = ranked[0] if ranked and ranked[0].meets else None
    return Plan(recommended=best, ranked=ranked, reference=judged[reference], slo_drain_s=slo_drain_s,
                max_miss_fraction=max_miss_fraction, seeds=tuple(seeds), max_replicas=sim.max_replicas,
                lag_threshold=sim.lag_threshold, windows=windows.describe() if windows is not None else ())


def _meets(result: SimResult, max_miss_fraction: float) -> bool:
    # jobs still waiting at the end count as misses once older than the SLO (simulate)
    return result.miss_fraction <= max_miss_fraction


_shared: dict = {}


def _init(trace: Trace, sim: SimConfig, market: SpotMarket, price: InstancePrice, windows: SpotWindows | None) -> None:
    _shared.update(trace=trace, sim=sim, market=market, price=price, windows=windows)  # once per worker process


def _one(task: tuple[Candidate, int, int]) -> SimResult:
    candidate, seed, w = task
    windows: SpotWindows | None = _shared["windows"]
    zones = windows.capacity(w, candidate.zones) if windows is not None else None
    return simulate(_shared["trace"], Policy("candidate", candidate.pools, candidate.placement), sim=_shared["sim"],
                    market=_shared["market"], price=_shared["price"], seed=seed, zones=zones)


def _run_all(tasks, trace, sim, market, price, windows, jobs, progress) -> list[SimResult]:
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    out: list[SimResult] = []
    if jobs == 1:
        _init(trace, sim, market, price, windows)
        for task in tasks:
            out.append(_one(task))
            if progress:
                progress(len(out), len(tasks))
        return out
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init, initargs=(trace, sim, market, price, windows)) as pool:
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
                "worst_drain_p95_s": e.worst_drain_p95_s, "fallback_hours": e.fallback_hours,
                "rows_recomputed": sum(r.rows_recomputed for r in e.results) / len(e.results),
                "placement": e.placement, "zones": list(e.zones)}
    rest = [e for e in plan.ranked if e is not plan.recommended]
    return {"kind": PLAN_KIND, "v": 1, "slo_drain_s": plan.slo_drain_s, "max_miss_fraction": plan.max_miss_fraction,
            "seeds": list(plan.seeds), "spot_trace_windows": list(plan.windows),
            "all_on_demand_cost": round(plan.reference.cost, 4),
            "recommended": row(plan.recommended) if plan.recommended else None, "margin": margin(plan),
            "runners_up": [row(e) for e in rest[:runners_up]], "candidates": len(plan.ranked),
            "meeting_slo": sum(e.meets for e in plan.ranked)}


def margin(plan: Plan) -> dict | None:
    """How far the pick is from failing: the SLO headroom on its worst window/seed, and
    what the next cheapest setting that also meets it would cost more."""
    best = plan.recommended
    if best is None:
        return None
    nxt = next((e for e in plan.ranked if e.meets and e is not best), None)
    return {"miss_fraction_allowed": plan.max_miss_fraction, "worst_miss_fraction": best.worst_miss_fraction,
            "miss_fraction_headroom": plan.max_miss_fraction - best.worst_miss_fraction,
            "worst_drain_p95_over_slo": best.worst_drain_p95_s / plan.slo_drain_s if plan.slo_drain_s else None,
            "next_meeting_cost_delta": (nxt.cost - best.cost) if nxt else None}


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

    over = "seeds " + ", ".join(map(str, plan.seeds)) + (f" x {len(plan.windows)} trace windows" if plan.windows else "")
    title = (f"plan: SLO drain {plan.slo_drain_s:g}s for >= {1 - plan.max_miss_fraction:.1%} of jobs on {over}; "
             f"all on-demand costs ${plan.reference.cost:,.2f}")
    view = Table(title=title)
    traced = bool(plan.windows)
    # Short headers: the table must fit an 80-column terminal (the caption explains them).
    heads = ("", "base", "cap", *(("place", "zones") if traced else ("spot",)), "cost $", "vs OD", "miss", "p95 drain", "SLO")
    for name in heads:
        view.add_column(name, justify="left" if name in ("", "place") else "right")
    shown = ([plan.recommended] if plan.recommended else []) + \
        [e for e in plan.ranked if e is not plan.recommended][:runners_up]
    for e in shown:
        label = "best" if e is plan.recommended else ""
        ratio = f"{e.cost / plan.reference.cost:.1%}" if plan.reference.cost else "-"
        middle = (e.placement.replace("zone-", ""), str(len(e.zones))) if traced else (str(e.pools.spot_max),)
        view.add_row(label, str(e.pools.baseline), str(e.pools.fallback_cap), *middle, f"{e.cost:,.0f}",
                     ratio, f"{e.worst_miss_fraction:.2%}", f"{e.worst_drain_p95_s:,.0f}s", "met" if e.meets else "MISSED")
    view.caption = ("base: on-demand baseline; cap: on-demand fallback cap above it; "
                    + ("place: spot placement over zones (spread or zone-aware); zones: the best N zones; " if traced else "spot: spot max; ")
                    + "vs OD: cost relative to all on-demand; miss, p95 drain: the worst over the runs")
    m = margin(plan)  # None exactly when nothing is recommended
    if plan.recommended is None or m is None:
        view.caption = "no setting met the SLO: relax --slo-drain / --max-miss-fraction or raise --max-replicas"
    else:
        view.caption += (f"\nmargin: worst miss {m['worst_miss_fraction']:.3%} of {m['miss_fraction_allowed']:.3%} allowed"
                         + (f"; the next setting that meets it costs ${m['next_meeting_cost_delta']:,.0f} more"
                            if m["next_meeting_cost_delta"] is not None else ""))
        if plan.recommended.zones:
            view.caption += f"\nzones: {', '.join(plan.recommended.zones)}"
    for line in plan.windows:
        view.caption += f"\n{line}"
    return view
