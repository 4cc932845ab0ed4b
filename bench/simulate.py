"""How fast the policy simulator runs, on the issue's case: 1,000 replicas, 30 days.

Method: one synthetic diurnal trace sized so the fleet peaks near --max-replicas
(mean rows/s = 0.55 x max replicas x rows/s per replica; the diurnal peak is 1.8 x
mean), then `compare` of the four standard policies on it, the same call
`spotbatch scheduler simulate` makes. Timed with time.perf_counter: trace generation
alone, and each policy's simulation (wall and process CPU time). The market: a monthly
interruption rate (AWS advisor bucket 5-10 %), one correlated event per month, spot
at the example file's g5.xlarge ratio (36 % of on-demand). The figures it prints about
cost and SLO misses are that scenario's, one seed.

    .venv/bin/python bench/simulate.py              # rich table
    .venv/bin/python bench/simulate.py --json       # one JSON object
    .venv/bin/python bench/simulate.py --max-replicas 100 --days 7 --seed 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spotbatch.scheduler.prices import InstancePrice  # noqa: E402
from spotbatch.scheduler.simulate import SimConfig, SpotMarket, simulate, standard_policies  # noqa: E402
from spotbatch.scheduler.traces import synthetic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-replicas", type=int, default=1000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--step-s", type=float, default=30.0)
    ap.add_argument("--rows-per-s", type=float, default=100.0, help="per replica")
    ap.add_argument("--rows-per-job", type=int, default=1000)
    ap.add_argument("--lag-threshold", type=int, default=30)
    ap.add_argument("--interruptions-per-month", type=float, default=0.075)
    ap.add_argument("--events-per-month", type=float, default=1.0)
    ap.add_argument("--event-kill-fraction", type=float, default=0.3)
    ap.add_argument("--shortage-s", type=float, default=3600.0)
    ap.add_argument("--slo-drain-s", type=float, default=1800.0)
    ap.add_argument("--baseline", type=int, default=None, help="default: 5%% of max replicas")
    ap.add_argument("--fallback-cap", type=int, default=None, help="default: 25%% of max replicas")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    mean_rows = 0.55 * args.max_replicas * args.rows_per_s
    t0 = time.perf_counter()
    trace = synthetic("diurnal", days=args.days, step_s=args.step_s, seed=args.seed, mean_rows_per_s=mean_rows,
                      rows_per_job=args.rows_per_job)
    trace_s = time.perf_counter() - t0
    sim = SimConfig(rows_per_s=args.rows_per_s, lag_threshold=args.lag_threshold, max_replicas=args.max_replicas,
                    slo_drain_s=args.slo_drain_s, step_s=args.step_s)
    market = SpotMarket(interruption_rate_per_h=args.interruptions_per_month / 720,
                        events_per_day=args.events_per_month / 30, event_kill_fraction=args.event_kill_fraction,
                        shortage_mean_s=args.shortage_s)
    price = InstancePrice("g5.xlarge", on_demand_per_h=1.006, spot_per_h=0.3622, gpus=1, region="example")
    baseline = args.baseline if args.baseline is not None else max(1, args.max_replicas // 20)
    cap = args.fallback_cap if args.fallback_cap is not None else max(1, args.max_replicas // 4)
    rows = []
    for policy in standard_policies(baseline=baseline, fallback_cap=cap, spot_max=args.max_replicas):
        w0, c0 = time.perf_counter(), time.process_time()
        result = simulate(trace, policy, sim=sim, market=market, price=price, seed=args.seed)
        rows.append({"policy": policy.name, "wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
                     "result": result})
    reference = rows[0]["result"].cost
    figures = {
        "config": {**vars(args), "mean_rows_per_s": mean_rows, "steps": trace.steps, "jobs": int(trace.jobs.sum())},
        "trace_s": round(trace_s, 3),
        "simulate_all_policies_s": round(sum(r["wall_s"] for r in rows), 3),
        "policies": [{"policy": r["policy"], "wall_s": round(r["wall_s"], 3), "cpu_s": round(r["cpu_s"], 3),
                      "peak_replicas": r["result"].peak_replicas, "cost": round(r["result"].cost, 2),
                      "cost_vs_all_on_demand": round(r["result"].cost / reference, 4),
                      "slo_misses": r["result"].slo_misses, "miss_fraction": r["result"].miss_fraction,
                      "interruptions": r["result"].interruptions, "rows_recomputed": round(r["result"].rows_recomputed),
                      "drain_p95_s": r["result"].drain_p95_s, "drain_max_s": r["result"].drain_max_s}
                     for r in rows],
    }
    if args.json:
        print(json.dumps(figures))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.max_replicas} replicas max, {args.days:g} days ({trace.steps:,} steps of "
                        f"{args.step_s:g}s); trace built in {trace_s:.2f}s; all policies {figures['simulate_all_policies_s']:.1f}s")
    for col in ("policy", "wall s", "cpu s", "peak replicas", "cost $", "vs on-demand", "SLO misses", "interruptions",
                "drain p95", "drain max"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for p in figures["policies"]:
        table.add_row(p["policy"], f"{p['wall_s']:.2f}", f"{p['cpu_s']:.2f}", str(p["peak_replicas"]), f"{p['cost']:,.0f}",
                      f"{p['cost_vs_all_on_demand']:.1%}", f"{p['slo_misses']:,} ({p['miss_fraction']:.3%})",
                      str(p["interruptions"]), f"{p['drain_p95_s']:.0f}s", f"{p['drain_max_s']:.0f}s")
    Console().print(table)


if __name__ == "__main__":
    main()
