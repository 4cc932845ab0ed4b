"""How fast the simulator replays recorded spot capacity: 1,000 replicas, 30 days, 9 zones.

Method: the 45-day 9-zone V100 availability set of "Can't Be Late" (NSDI '24), read from
../shared/ref/spot-traces (never copied into the repo), one V100 (p3.2xlarge) per
replica, each zone holding ceil(max replicas / 9) replicas when its 1-node probe reads 1
(--replicas-per-zone overrides). A synthetic diurnal load sized so the fleet peaks near
--max-replicas (mean rows/s = 0.55 x max replicas x rows/s per replica), then the four
standard policies plus zone-aware baseline + fallback, the calls `spotbatch scheduler
simulate --spot-trace` makes. Timed with time.perf_counter (wall) and process_time
(CPU): loading the traces, building the window's zone capacity, each policy. Prices:
p3.2xlarge on-demand $3.06/h (us-east-1 list price) and spot at --spot-share (35 %) of it;
the cost and SLO figures are that one seeded scenario's.

    .venv/bin/python bench/spot_traces.py              # rich table
    .venv/bin/python bench/spot_traces.py --json       # one JSON object
    .venv/bin/python bench/spot_traces.py --max-replicas 100 --days 30 --trace-start 15d
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spotbatch.scheduler.prices import InstancePrice  # noqa: E402
from spotbatch.scheduler.simulate import SimConfig, SpotMarket, simulate, standard_policies, zone_aware_policy  # noqa: E402
from spotbatch.scheduler.spot_traces import load_spot_traces, zone_capacity  # noqa: E402
from spotbatch.scheduler.traces import parse_duration_s, synthetic  # noqa: E402

REF = Path(__file__).resolve().parents[1].parent / "shared" / "ref" / "spot-traces"
V100_9 = REF / "availability" / "1-node" / "aws-02-15-2023"


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spot-trace", action="append", default=None, help=f"trace file or folder (default: {V100_9})")
    ap.add_argument("--max-replicas", type=int, default=1000)
    ap.add_argument("--replicas-per-zone", type=int, default=None)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--trace-start", default="0", help="where in the traces the window starts, e.g. 15d")
    ap.add_argument("--step-s", type=float, default=30.0)
    ap.add_argument("--rows-per-s", type=float, default=100.0, help="per replica")
    ap.add_argument("--rows-per-job", type=int, default=1000)
    ap.add_argument("--lag-threshold", type=int, default=30)
    ap.add_argument("--slo-drain-s", type=float, default=1800.0)
    ap.add_argument("--baseline", type=int, default=None, help="default: 5%% of max replicas")
    ap.add_argument("--fallback-cap", type=int, default=None, help="default: 25%% of max replicas")
    ap.add_argument("--spot-share", type=float, default=0.35, help="spot price / on-demand price")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    return ap.parse_args()


def main() -> None:
    args = _args()
    if not REF.is_dir() and args.spot_trace is None:
        sys.exit(f"error: spot traces not found at {REF}; check out ../shared/ref/spot-traces or pass --spot-trace")
    t0 = time.perf_counter()
    traces = load_spot_traces(args.spot_trace or [V100_9])
    load_s = time.perf_counter() - t0
    work = synthetic("diurnal", days=args.days, step_s=args.step_s, seed=args.seed,
                     mean_rows_per_s=0.55 * args.max_replicas * args.rows_per_s, rows_per_job=args.rows_per_job)
    t0 = time.perf_counter()
    zones = zone_capacity(traces, steps=work.steps, step_s=args.step_s, start_s=parse_duration_s(args.trace_start),
                          replicas_per_zone=args.replicas_per_zone, max_replicas=args.max_replicas)
    zones_s = time.perf_counter() - t0
    sim = SimConfig(rows_per_s=args.rows_per_s, lag_threshold=args.lag_threshold, max_replicas=args.max_replicas,
                    slo_drain_s=args.slo_drain_s, step_s=args.step_s)
    market = SpotMarket(interruption_rate_per_h=0.0, events_per_day=0.0)  # the traces alone
    price = InstancePrice("p3.2xlarge", on_demand_per_h=3.06, spot_per_h=round(3.06 * args.spot_share, 4), gpus=1,
                          region="us-east-1")
    baseline = args.baseline if args.baseline is not None else max(1, args.max_replicas // 20)
    cap = args.fallback_cap if args.fallback_cap is not None else max(1, args.max_replicas // 4)
    policies = standard_policies(baseline=baseline, fallback_cap=cap, spot_max=args.max_replicas)
    policies.append(zone_aware_policy(baseline=baseline, fallback_cap=cap, spot_max=args.max_replicas))
    rows = []
    for policy in policies:
        w0, c0 = time.perf_counter(), time.process_time()
        result = simulate(work, policy, sim=sim, market=market, price=price, seed=args.seed, zones=zones)
        rows.append((policy.name, time.perf_counter() - w0, time.process_time() - c0, result))
    _report(args, work, zones, price, load_s, zones_s, rows)


def _report(args, work, zones, price, load_s, zones_s, rows) -> None:
    reference = rows[0][3].cost
    figures = {
        "config": {**vars(args), "steps": work.steps, "jobs": int(work.jobs.sum()), "zones": list(zones.names),
                   "replicas_per_zone": list(zones.replicas_per_zone), "spot_per_h": price.spot_per_h,
                   "on_demand_per_h": price.on_demand_per_h, "describe": zones.describe()},
        "load_traces_s": round(load_s, 3), "zone_capacity_s": round(zones_s, 3),
        "simulate_all_policies_s": round(sum(r[1] for r in rows), 3),
        "policies": [{"policy": name, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "cost": round(r.cost, 2),
                      "cost_vs_all_on_demand": round(r.cost / reference, 4), "slo_misses": r.slo_misses,
                      "miss_fraction": r.miss_fraction, "fallback_hours": r.fallback_hours,
                      "interruptions": r.interruptions, "rows_recomputed": round(r.rows_recomputed),
                      "drain_p95_s": r.drain_p95_s, "peak_replicas": r.peak_replicas}
                     for name, wall, cpu, r in rows],
    }
    if args.json:
        print(json.dumps(figures))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.max_replicas} replicas max, {args.days:g} days ({work.steps:,} steps of {args.step_s:g}s), "
                        f"{zones.describe()}; traces loaded in {load_s:.2f}s, all policies "
                        f"{figures['simulate_all_policies_s']:.1f}s")
    for col in ("policy", "wall s", "vs on-demand", "SLO misses", "fallback h", "interruptions", "rows recomputed"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for p in figures["policies"]:
        table.add_row(p["policy"], f"{p['wall_s']:.2f}", f"{p['cost_vs_all_on_demand']:.1%}",
                      f"{p['slo_misses']:,} ({p['miss_fraction']:.2%})", f"{p['fallback_hours']:,.0f}",
                      f"{p['interruptions']:,}", f"{p['rows_recomputed']:,}")
    Console().print(table)


if __name__ == "__main__":
    main()
