"""``spotbatch scheduler simulate`` and ``plan``: the policy side of the scheduler.

Both take the same scenario (a trace, the replicas' speed, KEDA's settings, a spot
market, prices) and the same fallback settings: those options are declared once here
(``SCENARIO_OPTIONS``, ``POOL_OPTIONS``) and reach each command as one dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

from spotbatch.cli import spot_options as cs  # light: typer options only, imports inside
from spotbatch.cli.common import JsonOpt, ProgressLines, err, fail, grouped, option_group, out

__all__ = ["SCENARIO_OPTIONS", "POOL_OPTIONS", "register"]


def register(scheduler_app: typer.Typer) -> None:
    scheduler_app.command("simulate")(simulate)
    scheduler_app.command("plan")(plan)


# name -> (type, option): the keywords of _scenario, and of _pool_template.
SCENARIO_OPTIONS: dict[str, tuple[Any, Any]] = {
    "trace": (Optional[Path], typer.Option(
        None, "--trace", help="CSV trace: at_s,rows[,jobs] per line (see spotbatch/scheduler/traces.py).")),
    "synthetic": (Optional[str], typer.Option(None, "--synthetic", help="Synthetic trace instead: steady, diurnal or bursty.")),
    "days": (float, typer.Option(30.0, "--days", min=0.01, help="Length of a synthetic trace, days.")),
    "mean_rows_per_s": (float, typer.Option(
        500.0, "--mean-rows-per-s", min=0.0, help="Synthetic trace: mean rows arriving per second.")),
    "rows_per_job": (int, typer.Option(1000, "--rows-per-job", min=1, help="Synthetic trace: rows per job.")),
    "rows_per_s": (float, typer.Option(
        100.0, "--rows-per-s", min=0.001, help="Rows per second one ready replica processes.")),
    "cold_start": (str, typer.Option("2m", "--cold-start", help="Launch -> ready, e.g. 90s, 2m.")),
    "lag_threshold": (int, typer.Option(30, "--lag-threshold", min=1, help="KEDA lagThreshold: jobs per replica.")),
    "max_replicas": (int, typer.Option(100, "--max-replicas", min=1, help="Most replicas in total (both pools).")),
    "polling_interval": (str, typer.Option("30s", "--polling-interval", help="KEDA pollingInterval.")),
    "cooldown": (str, typer.Option("5m", "--cooldown", help="KEDA cooldownPeriod (also the HPA scale-in window).")),
    "checkpoint_interval": (str, typer.Option(
        "5m", "--checkpoint-interval", help="Work lost per interruption is half of this, on average.")),
    "step": (str, typer.Option("30s", "--step", help="Simulation step.")),
    "interruptions_per_month": (float, typer.Option(
        0.075, "--interruptions-per-month", min=0.0,
        help="Fraction of spot replicas interrupted per month (AWS advisor: 0.05-0.10 is '5-10%').")),
    "events_per_month": (float, typer.Option(
        1.0, "--events-per-month", min=0.0,
        help="Correlated spot events per month: a share of the pool reclaimed at once, then a shortage.")),
    "event_kill_fraction": (float, typer.Option(
        0.3, "--event-kill-fraction", min=0.0, max=1.0, help="Share of spot replicas one event reclaims.")),
    "shortage": (str, typer.Option("1h", "--shortage", help="Mean time after an event with no new spot capacity.")),
    "spot_capacity": (Optional[int], typer.Option(
        None, "--spot-capacity", min=0, help="Most spot replicas the market ever grants (default: unlimited).")),
    "prices_file": (Optional[Path], typer.Option(
        None, "--prices",
        help="Prices file (examples/prices.example.yaml); default: illustrative g5.xlarge-like prices.")),
    "instance_type": (Optional[str], typer.Option(
        None, "--instance-type", help="Instance type in --prices (default: its only one).")),
}
POOL_OPTIONS: dict[str, tuple[Any, Any]] = {
    "unready_grace": (str, typer.Option(
        "5m", "--unready-grace", help="Fallback when spot stays short of its request this long.")),
    "interruption_rate_max": (float, typer.Option(
        0.1, "--interruption-rate-max", min=0.0, help="...or spot interruptions per replica-hour exceed this.")),
    "recover": (str, typer.Option("10m", "--recover", help="Hand fallback back after spot is healthy this long.")),
}
SeedOpt = typer.Option(1, "--seed", help="Seed for the trace and the spot market.")


def _duration(text: str, flag: str) -> float:
    from spotbatch.durations import DurationError, parse_duration_s

    try:
        return parse_duration_s(text)
    except DurationError as exc:
        fail(f"{flag}: {exc}")


def _scenario(*, trace, synthetic, days, mean_rows_per_s, rows_per_job, seed, rows_per_s, cold_start, lag_threshold,
              max_replicas, polling_interval, cooldown, checkpoint_interval, step, interruptions_per_month,
              events_per_month, event_kill_fraction, shortage, spot_capacity, prices_file, instance_type, slo_drain="30m"):
    """CLI options -> (trace, SimConfig, SpotMarket, InstancePrice); bad input exits with the fix."""
    from spotbatch.scheduler import traces
    from spotbatch.scheduler.simulate import SimConfig, SpotMarket

    step_s = _duration(step, "--step")
    if step_s <= 0:
        fail("--step must be > 0, e.g. --step 30s")
    if (trace is None) == (synthetic is None):
        fail("pass exactly one of --trace FILE or --synthetic steady|diurnal|bursty")
    try:
        workload = (traces.load_csv(trace, step_s=step_s) if trace is not None else
                    traces.synthetic(synthetic, days=days, step_s=step_s, seed=seed, mean_rows_per_s=mean_rows_per_s,
                                     rows_per_job=rows_per_job))
    except traces.TraceError as exc:
        fail(str(exc))
    sim = SimConfig(rows_per_s=rows_per_s, cold_start_s=_duration(cold_start, "--cold-start"), lag_threshold=lag_threshold,
                    max_replicas=max_replicas, polling_interval_s=_duration(polling_interval, "--polling-interval"),
                    cooldown_s=_duration(cooldown, "--cooldown"),
                    checkpoint_interval_s=_duration(checkpoint_interval, "--checkpoint-interval"),
                    slo_drain_s=_duration(slo_drain, "--slo-drain"), step_s=step_s)
    market = SpotMarket(interruption_rate_per_h=interruptions_per_month / 720, events_per_day=events_per_month / 30,
                        event_kill_fraction=event_kill_fraction, shortage_mean_s=_duration(shortage, "--shortage"),
                        spot_capacity=spot_capacity)
    return workload, sim, market, _sim_price(prices_file, instance_type)


def _sim_price(path: Optional[Path], instance_type: Optional[str]):
    from spotbatch.scheduler.prices import InstancePrice, PricesError, load_prices

    if path is None:
        if instance_type:
            fail("--instance-type needs --prices FILE")
        # g5.xlarge-like figures from examples/prices.example.yaml: illustrative, not a quote
        return InstancePrice("example", on_demand_per_h=1.006, spot_per_h=0.3622, gpus=1, region="illustrative")
    try:
        table = load_prices(path)
    except PricesError as exc:
        fail(str(exc))
    if instance_type is None and len(table) > 1:
        fail(f"{path} prices {len(table)} instance types; pick one with --instance-type ({', '.join(sorted(table))})")
    name = instance_type or next(iter(table))
    if name not in table:
        fail(f"{path} has no instance type {name!r}; pick one of {', '.join(sorted(table))}")
    return table[name]


def _pool_template(*, unready_grace: str, interruption_rate_max: float, recover: str):
    from spotbatch.scheduler.pools import PoolConfig

    return PoolConfig(unready_grace_s=_duration(unready_grace, "--unready-grace"),
                      interruption_rate_max_per_h=interruption_rate_max, recover_s=_duration(recover, "--recover"))


@option_group(POOL_OPTIONS, into="pool")
@option_group(SCENARIO_OPTIONS, into="scenario")
def simulate(
    scenario: dict,
    seed: int = SeedOpt,
    slo_drain: str = typer.Option("30m", "--slo-drain", help="A job draining later than this is an SLO miss."),
    baseline: int = typer.Option(2, "--baseline", min=0, help="On-demand baseline of the 'baseline' policies."),
    fallback_cap: Optional[int] = typer.Option(None, "--fallback-cap", min=0, help="Fallback cap (default: a quarter of --max-replicas)."),
    pool: Optional[dict[str, Any]] = None,  # POOL_OPTIONS go here in --help
    spot_trace: Optional[List[Path]] = cs.SpotTraceOpt, replicas_per_zone: Optional[int] = cs.ReplicasPerZoneOpt,
    spot_trace_fit: str = cs.FitOpt, trace_start: str = cs.TraceStartOpt, zone_window: str = cs.ZoneWindowOpt,
    plot: Optional[Path] = cs.PlotOpt, as_json: bool = JsonOpt,
) -> None:
    """Compare all on-demand, all spot, baseline k and baseline k + fallback on one trace
    (with --spot-trace, also zone-aware k + fallback, on recorded spot capacity)."""
    from dataclasses import replace

    from spotbatch.scheduler import simulate as sm

    cs.check_plot(plot)
    spot_traces = cs.load_or_fail(spot_trace, spot_trace_fit, scenario["spot_capacity"])
    workload, sim, market, price = _scenario(**scenario, seed=seed, slo_drain=slo_drain)
    max_replicas = scenario["max_replicas"]
    sim = replace(sim, zone_score_window_s=_duration(zone_window, "--zone-window"))
    workload, zones = cs.simulate_zones(spot_traces, workload, start=trace_start, fit=spot_trace_fit,
                                        replicas_per_zone=replicas_per_zone, max_replicas=max_replicas, duration=_duration)
    template = _pool_template(**grouped(pool))
    cap = fallback_cap if fallback_cap is not None else max(1, max_replicas // 4)
    chosen = sm.standard_policies(baseline=baseline, fallback_cap=cap, spot_max=max_replicas)
    if zones is not None:
        chosen.append(sm.zone_aware_policy(baseline=baseline, fallback_cap=cap, spot_max=max_replicas))
    policies = [replace(p, pools=replace(p.pools, unready_grace_s=template.unready_grace_s,
                                         interruption_rate_max_per_h=template.interruption_rate_max_per_h,
                                         recover_s=template.recover_s)) for p in chosen]
    runs = [sm.simulate_timeline(workload, p, sim=sim, market=market, price=price, seed=seed, zones=zones)
            for p in policies]
    results = [r for r, _ in runs]
    title = (f"{workload.name}, seed {seed}, SLO drain {sim.slo_drain_s:g}s, "
             f"prices {price.instance_type} (od ${price.on_demand_per_h}/h, spot ${price.spot_per_h}/h)")
    if plot is not None:
        from spotbatch.scheduler.sim_plot import plot_timelines

        plot_timelines(plot, [(p.name, tl) for p, (_, tl) in zip(policies, runs)], title=title)
    if as_json:
        doc = sm.comparison_json(results, workload, sim, market, price, seed)
        if zones is not None:
            doc["spot_traces"] = {"zones": list(zones.names), "files": [t.path for t in spot_traces], "fit": zones.fit,
                                  "looped": list(zones.looped), "start_s": zones.start_s,
                                  "replicas_per_zone": list(zones.replicas_per_zone), "describe": zones.describe()}
        print(json.dumps(doc))
        return
    out.print(sm.comparison_table(results, title=title))
    if zones is not None:
        out.print(zones.describe() + "; synthetic capacity events off")


@option_group(POOL_OPTIONS, into="pool")
@option_group(SCENARIO_OPTIONS, into="scenario")
def plan(
    scenario: dict,
    slo_drain: str = typer.Option(..., "--slo-drain", help="Jobs must drain within this, e.g. 30m."),
    max_miss_fraction: float = typer.Option(0.001, "--max-miss-fraction", min=0.0, max=1.0, help="Share of jobs allowed to miss the SLO (per seed)."),
    seeds: str = typer.Option("1,2", "--seeds", help="Comma-separated seeds; a setting must meet the SLO on each."),
    baselines: Optional[str] = typer.Option(None, "--baselines", help="Comma-separated baselines to try (default 0,1,2,4,... up to max/2)."),
    fallback_caps: Optional[str] = typer.Option(None, "--fallback-caps", help="Comma-separated caps to try (default 0 and 1/8..all of max)."),
    pool: Optional[dict[str, Any]] = None,  # POOL_OPTIONS go here in --help
    jobs: int = typer.Option(0, "--jobs", min=0, help="Processes to simulate in (0 = one per CPU)."),
    runners_up: int = typer.Option(5, "--runners-up", min=0, help="How many runners-up to show."),
    spot_trace: Optional[List[Path]] = cs.SpotTraceOpt, replicas_per_zone: Optional[int] = cs.ReplicasPerZoneOpt,
    spot_trace_fit: str = cs.FitOpt, trace_starts: str = cs.TraceStartsOpt, zone_counts: Optional[str] = cs.ZoneCountsOpt,
    placements: str = cs.PlacementsOpt, zone_window: str = cs.ZoneWindowOpt, plot: Optional[Path] = cs.PlanPlotOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Recommend the cheapest baseline + fallback cap (with --spot-trace: and placement and zone
    count) that meets --slo-drain on every seed and trace window (input to apply)."""
    from dataclasses import replace

    from rich.progress import Progress

    from spotbatch.scheduler import plan as pl

    seed_list = _ints(seeds, "--seeds")
    cs.check_plot(plot)
    spot_traces = cs.load_or_fail(spot_trace, spot_trace_fit, scenario["spot_capacity"])
    placement_list = cs.placements_or_fail(placements)
    workload, sim, market, price = _scenario(**scenario, seed=seed_list[0], slo_drain=slo_drain)
    max_replicas = scenario["max_replicas"]
    sim = replace(sim, zone_score_window_s=_duration(zone_window, "--zone-window"))
    workload, windows = cs.plan_windows(spot_traces, workload, starts=trace_starts, fit=spot_trace_fit,
                                        replicas_per_zone=replicas_per_zone, max_replicas=max_replicas,
                                        duration=_duration)
    # Progress goes to stderr, so it shows with --json too (stdout stays one JSON object);
    # off a terminal (logs, CI) as plain lines.
    lines = ProgressLines("plan: simulations")
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("simulating candidates", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            lines.update(done, total)

        result = pl.search(workload, sim=sim, market=market, price=price, seeds=seed_list, slo_drain_s=sim.slo_drain_s,
                           max_miss_fraction=max_miss_fraction,
                           baselines=_ints(baselines, "--baselines") if baselines else None,
                           fallback_caps=_ints(fallback_caps, "--fallback-caps") if fallback_caps else None,
                           template=_pool_template(**grouped(pool)), jobs=jobs,
                           progress=tick, windows=windows, zone_counts=_ints(zone_counts, "--zone-counts") if zone_counts else None,
                           placements=placement_list)
    if plot is not None and result.recommended is not None:
        cs.plot_pick(plot, result.recommended, workload, sim=sim, market=market, price=price, seed=seed_list[0],
                     windows=windows)
    if as_json:
        print(json.dumps(pl.plan_json(result, runners_up=runners_up)))
    else:
        out.print(pl.plan_table(result, runners_up=runners_up))
    if result.recommended is None:
        raise typer.Exit(1)  # scripts: no setting met the SLO


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} {text!r} is not a comma-separated list of integers, e.g. {flag} 0,2,4")
    if not values or min(values) < 0:
        fail(f"{flag} needs at least one integer >= 0, e.g. {flag} 0,2,4")
    return values
