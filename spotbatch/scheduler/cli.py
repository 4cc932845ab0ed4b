"""``spotbatch scheduler ...``: prices, simulate, plan, apply, report.

Keep imports of heavy modules (kafka, boto3, matplotlib, kubernetes) inside the
command bodies: ``spotbatch --help`` must stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from spotbatch.kafka_security import client_options
from spotbatch.scheduler import cli_spot as cs  # light: typer options only, imports inside

__all__ = ["register"]

scheduler_app = typer.Typer(no_args_is_help=True, help="Hybrid spot/on-demand scheduler: costs, plans, reports.")


def _fail(message: str, code: int = 2) -> None:
    from spotbatch.cli_common import fail  # the one format for CLI errors

    fail(message, code)


def _print(renderable) -> None:
    from spotbatch.cli_common import out

    out.print(renderable)


# ---- prices and report (the cost side) ------------------------------------------------


@scheduler_app.command()
def prices(
    file: Path = typer.Option(Path("prices.yaml"), "--file", help="Prices file to print, or to write with --refresh."),
    refresh: bool = typer.Option(False, "--refresh", help="Fetch current prices from AWS and write FILE."),
    region: Optional[str] = typer.Option(None, help="AWS region to price (with --refresh), e.g. us-east-1."),
    types: Optional[str] = typer.Option(None, help="Comma-separated instance types (default: FILE's, else common GPU types)."),
    spot_stat: str = typer.Option("mean", help="Combine zones' spot prices by 'mean' or 'min'."),
    as_json: bool = typer.Option(False, "--json", help="Print the prices as JSON."),
) -> None:
    """Print a prices file as a table, or --refresh it from AWS (EC2 spot history + Pricing API)."""
    from spotbatch.scheduler.prices import PricesError, load_prices

    if refresh:
        _refresh(file, region, types, spot_stat)
    try:
        table = load_prices(file)
    except PricesError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps({t: {k: v for k, v in vars(p).items() if k != "instance_type"} for t, p in table.items()}))
        return
    _print(_prices_table(table, str(file)))


def _refresh(file: Path, region: Optional[str], types: Optional[str], spot_stat: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from spotbatch.scheduler.prices import PricesError, load_prices, save_prices
    from spotbatch.scheduler.pricing_aws import DEFAULT_TYPES, PricingError, aws_clients, refresh_prices

    if not region:
        _fail("--refresh needs --region, e.g. --region us-east-1")
    if spot_stat not in ("mean", "min"):
        _fail(f"--spot-stat {spot_stat!r} is not 'mean' or 'min'; pass one of those")
    wanted = [t.strip() for t in types.split(",") if t.strip()] if types else None
    if wanted is None:
        try:
            wanted = sorted(load_prices(file)) if file.is_file() else list(DEFAULT_TYPES)
        except PricesError:
            wanted = list(DEFAULT_TYPES)
    ec2, pricing = aws_clients(region)
    try:
        fresh = refresh_prices(wanted, region, ec2=ec2, pricing=pricing, spot_stat=spot_stat)
    except PricingError as exc:
        _fail(str(exc), code=1)
    except (BotoCoreError, ClientError) as exc:
        _fail(f"AWS refused the price query ({exc}); configure credentials (AWS_PROFILE or "
              f"AWS_ACCESS_KEY_ID) allowed ec2:DescribeSpotPriceHistory and pricing:GetProducts", code=1)
    save_prices(file, fresh, note=f"AWS prices for {region} fetched {_now_iso()}; spot = {spot_stat} over zones")


def _now_iso() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _prices_table(table, source: str):
    from rich.table import Table

    view = Table(title=f"prices ({source})")
    for name in ("instance type", "on-demand $/h", "spot $/h", "spot / on-demand", "GPUs", "region"):
        view.add_column(name, justify="left" if name in ("instance type", "region") else "right")
    for t, p in sorted(table.items()):
        ratio = f"{p.spot_per_h / p.on_demand_per_h:.0%}" if p.on_demand_per_h else "-"
        view.add_row(t, f"{p.on_demand_per_h:.4f}", f"{p.spot_per_h:.4f}", ratio, str(p.gpus), p.region)
    return view


@scheduler_app.command()
def report(
    bootstrap: Optional[str] = typer.Option(None, "--bootstrap", help="Kafka bootstrap servers [env SPOTBATCH_KAFKA_BOOTSTRAP]."),
    usage_topic: Optional[str] = typer.Option(None, help="Usage topic [env SPOTBATCH_USAGE_TOPIC]."),
    prices_file: Optional[Path] = typer.Option(None, "--prices", help="Prices file (default: built-in illustrative demo prices for type 'local')."),
    since: str = typer.Option("-24h", help="Window start: ISO 8601 (UTC if no zone) or relative like -24h, -7d; 'all' for no start."),
    until: str = typer.Option("now", help="Window end: ISO 8601, relative, or now."),
    bucket_s: Optional[float] = typer.Option(None, min=1, help="Width of the over-time buckets (default: about 48 over the window)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the per-pool rows as CSV."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG of cost and replicas per pool over time."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML settings file [env SPOTBATCH_CONFIG]."),
) -> None:
    """Cost per pool from the usage ledger and prices: GPU-hours, busy, $, $/1k rows, savings."""
    from spotbatch.cli_common import load_or_exit as _settings
    from spotbatch.scheduler import report as rep
    from spotbatch.scheduler.ledger import LedgerError, Window, read_ledger

    if as_json and as_csv:
        _fail("--json and --csv both given; pick one output format")
    if plot is not None and plot.suffix.lower() != ".png":
        _fail(f"--plot {plot} must name a .png file")
    settings = _settings(config, kafka_bootstrap=bootstrap, usage_topic=usage_topic)
    table, source = _report_prices(prices_file)
    try:
        window = Window.parse(None if since == "all" else since, until)
        ledger = read_ledger(settings.kafka_bootstrap, settings.usage_topic, window=window,
                             client_options=client_options(settings))
        result = rep.compute_report(ledger, table, window, prices_source=source, bucket_s=bucket_s)
    except (LedgerError, rep.UnpricedError) as exc:
        _fail(str(exc))
    if plot is not None:
        rep.plot_report(result, plot)
    from spotbatch.cli_common import err

    note = rep.empty_note(result)
    if as_json:
        print(json.dumps(rep.report_json(result)))
    elif as_csv:
        print(rep.report_csv(result), end="")
    elif not note:
        _print(rep.render_table(result))
    if note:  # exit 1: nothing to report (a wrong --usage-topic or --bootstrap looks the same)
        err.print(f"{note}; workers publish one to {settings.usage_topic} every {settings.usage_interval_s:g}s: "
                  "widen --since, or check --bootstrap and --usage-topic", highlight=False, markup=False)
        raise typer.Exit(1)


def _report_prices(path: Optional[Path]):
    from spotbatch.scheduler.prices import PricesError, demo_prices, load_prices

    if path is None:
        return demo_prices(), "built-in illustrative demo prices (not a quote; pass --prices FILE)"
    try:
        return load_prices(path), str(path)
    except PricesError as exc:
        _fail(str(exc))


# ---- simulate, plan and apply (the policy side) ---------------------------------------

TraceOpt = typer.Option(None, "--trace", help="CSV trace: at_s,rows[,jobs] per line (see spotbatch/scheduler/traces.py).")
SyntheticOpt = typer.Option(None, "--synthetic", help="Synthetic trace instead: steady, diurnal or bursty.")
DaysOpt = typer.Option(30.0, "--days", min=0.01, help="Length of a synthetic trace, days.")
MeanRowsOpt = typer.Option(500.0, "--mean-rows-per-s", min=0.0, help="Synthetic trace: mean rows arriving per second.")
RowsPerJobOpt = typer.Option(1000, "--rows-per-job", min=1, help="Synthetic trace: rows per job.")
SeedOpt = typer.Option(1, "--seed", help="Seed for the trace and the spot market.")
RowsPerSOpt = typer.Option(100.0, "--rows-per-s", min=0.001, help="Rows per second one ready replica processes.")
ColdStartOpt = typer.Option("2m", "--cold-start", help="Launch -> ready, e.g. 90s, 2m.")
LagThresholdOpt = typer.Option(30, "--lag-threshold", min=1, help="KEDA lagThreshold: jobs per replica.")
MaxReplicasOpt = typer.Option(100, "--max-replicas", min=1, help="Most replicas in total (both pools).")
PollOpt = typer.Option("30s", "--polling-interval", help="KEDA pollingInterval.")
CooldownOpt = typer.Option("5m", "--cooldown", help="KEDA cooldownPeriod (also the HPA scale-in window).")
CheckpointOpt = typer.Option("5m", "--checkpoint-interval", help="Work lost per interruption is half of this, on average.")
StepOpt = typer.Option("30s", "--step", help="Simulation step.")
MonthlyRateOpt = typer.Option(0.075, "--interruptions-per-month", min=0.0, help="Fraction of spot replicas interrupted per month (AWS advisor: 0.05-0.10 is '5-10%').")
EventsOpt = typer.Option(1.0, "--events-per-month", min=0.0, help="Correlated spot events per month: a share of the pool reclaimed at once, then a shortage.")
KillOpt = typer.Option(0.3, "--event-kill-fraction", min=0.0, max=1.0, help="Share of spot replicas one event reclaims.")
ShortageOpt = typer.Option("1h", "--shortage", help="Mean time after an event with no new spot capacity.")
SpotCapacityOpt = typer.Option(None, "--spot-capacity", min=0, help="Most spot replicas the market ever grants (default: unlimited).")
PricesOpt = typer.Option(None, "--prices", help="Prices file (examples/prices.example.yaml); default: illustrative g5.xlarge-like prices.")
InstanceOpt = typer.Option(None, "--instance-type", help="Instance type in --prices (default: its only one).")
GraceOpt = typer.Option("5m", "--unready-grace", help="Fallback when spot stays short of its request this long.")
RateMaxOpt = typer.Option(0.1, "--interruption-rate-max", min=0.0, help="...or spot interruptions per replica-hour exceed this.")
RecoverOpt = typer.Option("10m", "--recover", help="Hand fallback back after spot is healthy this long.")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")


def _duration(text: str, flag: str) -> float:
    from spotbatch.scheduler.traces import parse_duration_s

    try:
        return parse_duration_s(text)
    except ValueError as exc:
        _fail(f"{flag}: {exc}")


def _scenario(*, trace, synthetic, days, mean_rows_per_s, rows_per_job, seed, rows_per_s, cold_start, lag_threshold,
              max_replicas, polling_interval, cooldown, checkpoint_interval, step, interruptions_per_month,
              events_per_month, event_kill_fraction, shortage, spot_capacity, prices_file, instance_type, slo_drain="30m"):
    """CLI options -> (trace, SimConfig, SpotMarket, InstancePrice); bad input exits with the fix."""
    from spotbatch.scheduler import traces
    from spotbatch.scheduler.simulate import SimConfig, SpotMarket

    step_s = _duration(step, "--step")
    if step_s <= 0:
        _fail("--step must be > 0, e.g. --step 30s")
    if (trace is None) == (synthetic is None):
        _fail("pass exactly one of --trace FILE or --synthetic steady|diurnal|bursty")
    try:
        workload = (traces.load_csv(trace, step_s=step_s) if trace is not None else
                    traces.synthetic(synthetic, days=days, step_s=step_s, seed=seed, mean_rows_per_s=mean_rows_per_s,
                                     rows_per_job=rows_per_job))
    except traces.TraceError as exc:
        _fail(str(exc))
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
            _fail("--instance-type needs --prices FILE")
        # g5.xlarge-like figures from examples/prices.example.yaml: illustrative, not a quote
        return InstancePrice("example", on_demand_per_h=1.006, spot_per_h=0.3622, gpus=1, region="illustrative")
    try:
        table = load_prices(path)
    except PricesError as exc:
        _fail(str(exc))
    if instance_type is None and len(table) > 1:
        _fail(f"{path} prices {len(table)} instance types; pick one with --instance-type ({', '.join(sorted(table))})")
    name = instance_type or next(iter(table))
    if name not in table:
        _fail(f"{path} has no instance type {name!r}; pick one of {', '.join(sorted(table))}")
    return table[name]


def _pool_template(unready_grace: str, interruption_rate_max: float, recover: str):
    from spotbatch.scheduler.pools import PoolConfig

    return PoolConfig(unready_grace_s=_duration(unready_grace, "--unready-grace"),
                      interruption_rate_max_per_h=interruption_rate_max, recover_s=_duration(recover, "--recover"))


@scheduler_app.command()
def simulate(
    trace: Optional[Path] = TraceOpt, synthetic: Optional[str] = SyntheticOpt, days: float = DaysOpt,
    mean_rows_per_s: float = MeanRowsOpt, rows_per_job: int = RowsPerJobOpt, seed: int = SeedOpt,
    rows_per_s: float = RowsPerSOpt, cold_start: str = ColdStartOpt, lag_threshold: int = LagThresholdOpt,
    max_replicas: int = MaxReplicasOpt, polling_interval: str = PollOpt, cooldown: str = CooldownOpt,
    checkpoint_interval: str = CheckpointOpt, step: str = StepOpt, interruptions_per_month: float = MonthlyRateOpt,
    events_per_month: float = EventsOpt, event_kill_fraction: float = KillOpt, shortage: str = ShortageOpt,
    spot_capacity: Optional[int] = SpotCapacityOpt, prices_file: Optional[Path] = PricesOpt,
    instance_type: Optional[str] = InstanceOpt,
    slo_drain: str = typer.Option("30m", "--slo-drain", help="A job draining later than this is an SLO miss."),
    baseline: int = typer.Option(2, "--baseline", min=0, help="On-demand baseline of the 'baseline' policies."),
    fallback_cap: Optional[int] = typer.Option(None, "--fallback-cap", min=0, help="Fallback cap (default: a quarter of --max-replicas)."),
    unready_grace: str = GraceOpt, interruption_rate_max: float = RateMaxOpt, recover: str = RecoverOpt,
    spot_trace: Optional[List[Path]] = cs.SpotTraceOpt, replicas_per_zone: Optional[int] = cs.ReplicasPerZoneOpt,
    spot_trace_fit: str = cs.FitOpt, trace_start: str = cs.TraceStartOpt, zone_window: str = cs.ZoneWindowOpt,
    plot: Optional[Path] = cs.PlotOpt, as_json: bool = JsonOpt,
) -> None:
    """Compare all on-demand, all spot, baseline k and baseline k + fallback on one trace
    (with --spot-trace, also zone-aware k + fallback, on recorded spot capacity)."""
    from dataclasses import replace

    from spotbatch.scheduler import simulate as sm

    cs.check_plot(plot)
    spot_traces = cs.load_or_fail(spot_trace, spot_trace_fit, spot_capacity)
    workload, sim, market, price = _scenario(
        trace=trace, synthetic=synthetic, days=days, mean_rows_per_s=mean_rows_per_s, rows_per_job=rows_per_job,
        seed=seed, rows_per_s=rows_per_s, cold_start=cold_start, lag_threshold=lag_threshold, max_replicas=max_replicas,
        polling_interval=polling_interval, cooldown=cooldown, checkpoint_interval=checkpoint_interval, step=step,
        interruptions_per_month=interruptions_per_month, events_per_month=events_per_month,
        event_kill_fraction=event_kill_fraction, shortage=shortage, spot_capacity=spot_capacity,
        prices_file=prices_file, instance_type=instance_type, slo_drain=slo_drain)
    sim = replace(sim, zone_score_window_s=_duration(zone_window, "--zone-window"))
    workload, zones = cs.simulate_zones(spot_traces, workload, start=trace_start, fit=spot_trace_fit,
                                        replicas_per_zone=replicas_per_zone, max_replicas=max_replicas, duration=_duration)
    template = _pool_template(unready_grace, interruption_rate_max, recover)
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
    _print(sm.comparison_table(results, title=title))
    if zones is not None:
        _print(zones.describe() + "; synthetic capacity events off")


@scheduler_app.command()
def plan(
    trace: Optional[Path] = TraceOpt, synthetic: Optional[str] = SyntheticOpt, days: float = DaysOpt,
    mean_rows_per_s: float = MeanRowsOpt, rows_per_job: int = RowsPerJobOpt,
    rows_per_s: float = RowsPerSOpt, cold_start: str = ColdStartOpt, lag_threshold: int = LagThresholdOpt,
    max_replicas: int = MaxReplicasOpt, polling_interval: str = PollOpt, cooldown: str = CooldownOpt,
    checkpoint_interval: str = CheckpointOpt, step: str = StepOpt, interruptions_per_month: float = MonthlyRateOpt,
    events_per_month: float = EventsOpt, event_kill_fraction: float = KillOpt, shortage: str = ShortageOpt,
    spot_capacity: Optional[int] = SpotCapacityOpt, prices_file: Optional[Path] = PricesOpt,
    instance_type: Optional[str] = InstanceOpt,
    slo_drain: str = typer.Option(..., "--slo-drain", help="Jobs must drain within this, e.g. 30m."),
    max_miss_fraction: float = typer.Option(0.001, "--max-miss-fraction", min=0.0, max=1.0, help="Share of jobs allowed to miss the SLO (per seed)."),
    seeds: str = typer.Option("1,2", "--seeds", help="Comma-separated seeds; a setting must meet the SLO on each."),
    baselines: Optional[str] = typer.Option(None, "--baselines", help="Comma-separated baselines to try (default 0,1,2,4,... up to max/2)."),
    fallback_caps: Optional[str] = typer.Option(None, "--fallback-caps", help="Comma-separated caps to try (default 0 and 1/8..all of max)."),
    unready_grace: str = GraceOpt, interruption_rate_max: float = RateMaxOpt, recover: str = RecoverOpt,
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
    spot_traces = cs.load_or_fail(spot_trace, spot_trace_fit, spot_capacity)
    placement_list = cs.placements_or_fail(placements)
    workload, sim, market, price = _scenario(
        trace=trace, synthetic=synthetic, days=days, mean_rows_per_s=mean_rows_per_s, rows_per_job=rows_per_job,
        seed=seed_list[0], rows_per_s=rows_per_s, cold_start=cold_start, lag_threshold=lag_threshold,
        max_replicas=max_replicas, polling_interval=polling_interval, cooldown=cooldown,
        checkpoint_interval=checkpoint_interval, step=step, interruptions_per_month=interruptions_per_month,
        events_per_month=events_per_month, event_kill_fraction=event_kill_fraction, shortage=shortage,
        spot_capacity=spot_capacity, prices_file=prices_file, instance_type=instance_type, slo_drain=slo_drain)
    sim = replace(sim, zone_score_window_s=_duration(zone_window, "--zone-window"))
    workload, windows = cs.plan_windows(spot_traces, workload, starts=trace_starts, fit=spot_trace_fit,
                                        replicas_per_zone=replicas_per_zone, max_replicas=max_replicas,
                                        duration=_duration)
    from spotbatch.cli_common import ProgressLines, err

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
                           template=_pool_template(unready_grace, interruption_rate_max, recover), jobs=jobs,
                           progress=tick, windows=windows, zone_counts=_ints(zone_counts, "--zone-counts") if zone_counts else None,
                           placements=placement_list)
    if plot is not None and result.recommended is not None:
        cs.plot_pick(plot, result.recommended, workload, sim=sim, market=market, price=price, seed=seed_list[0],
                     windows=windows)
    if as_json:
        print(json.dumps(pl.plan_json(result, runners_up=runners_up)))
    else:
        _print(pl.plan_table(result, runners_up=runners_up))
    if result.recommended is None:
        raise typer.Exit(1)  # scripts: no setting met the SLO


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"{flag} {text!r} is not a comma-separated list of integers, e.g. {flag} 0,2,4")
    if not values or min(values) < 0:
        _fail(f"{flag} needs at least one integer >= 0, e.g. {flag} 0,2,4")
    return values


@scheduler_app.command()
def apply(
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="`plan --json` output to apply."),
    baseline: Optional[int] = typer.Option(None, "--baseline", min=0, help="Without --plan: on-demand baseline."),
    fallback_cap: Optional[int] = typer.Option(None, "--fallback-cap", min=0, help="Without --plan: fallback cap."),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", min=1, help="Without --plan: most replicas in total."),
    spot_max: Optional[int] = typer.Option(None, "--spot-max", min=0, help="Without --plan: most spot replicas (default: max replicas)."),
    namespace: str = typer.Option("spotbatch", "--namespace", help="Namespace of the ScaledObjects."),
    kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", help="Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)."),
    context: Optional[str] = typer.Option(None, "--context", help="Kubeconfig context."),
    yes: bool = typer.Option(False, "--yes", help="Patch the ScaledObjects (default: print the diff only)."),
    as_json: bool = JsonOpt,
) -> None:
    """Write a setting to the ScaledObjects: diff by default, --yes to patch."""
    from spotbatch.scheduler import apply as ap

    pools, total, lag_threshold = _apply_setting(plan_file, baseline, fallback_cap, max_replicas, spot_max)
    try:
        api = ap.KubeScaledObjects(namespace=namespace, kubeconfig=kubeconfig, context=context)
        changes = ap.plan_changes(api, pools, total, lag_threshold=lag_threshold)
        patched = ap.apply_changes(api, changes) if yes else []
    except ap.ApplyError as exc:
        _fail(str(exc), code=1)
    if as_json:
        print(json.dumps({"namespace": namespace, "dry_run": not yes, "patched": patched,
                          "changes": [{"name": c.name, "pool": c.pool, "changed": c.changed, "current": c.current,
                                       "desired": c.desired} for c in changes]}))
        return
    for change in changes:
        typer.echo(change.diff() or f"{change.name}: up to date")
    if not yes and any(c.changed for c in changes):
        typer.echo("dry run: nothing patched; rerun with --yes to apply", err=True)
    elif yes:
        typer.echo(f"patched: {', '.join(patched) or 'nothing (up to date)'}", err=True)


def _apply_setting(plan_file, baseline, fallback_cap, max_replicas, spot_max):
    from spotbatch.scheduler.plan import PlanError, setting_from_plan
    from spotbatch.scheduler.pools import PoolConfig

    flags = (baseline, fallback_cap, max_replicas, spot_max)
    if plan_file is not None:
        if any(f is not None for f in flags):
            _fail("--plan and --baseline/--fallback-cap/--max-replicas/--spot-max both given; pass one or the other")
        try:
            doc = json.loads(plan_file.read_text())
            setting = setting_from_plan(doc, str(plan_file))
            _note_zones(doc["recommended"])
            return setting
        except FileNotFoundError:
            _fail(f"plan file {plan_file} does not exist; make one with `spotbatch scheduler plan ... --json > {plan_file}`")
        except (json.JSONDecodeError, PlanError) as exc:
            _fail(f"{plan_file}: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc))
    if baseline is None or max_replicas is None:
        _fail("pass --plan FILE, or --baseline N and --max-replicas N (and optionally --fallback-cap, --spot-max)")
    return PoolConfig(baseline=baseline, fallback_cap=fallback_cap or 0,
                      spot_max=max_replicas if spot_max is None else spot_max), max_replicas, None


def _note_zones(rec: dict) -> None:
    """A plan made on spot traces also names zones and a placement: apply cannot write
    those (they belong to the spot node pool), so say so rather than drop them silently."""
    if rec.get("zones") or rec.get("placement", "spread") != "spread":
        typer.echo(f"note: the plan's spot placement ({rec.get('placement', 'spread')}) and zones "
                   f"({', '.join(rec.get('zones') or []) or 'all'}) are not written by apply; set them on the spot "
                   f"node pool (e.g. a topology.kubernetes.io/zone requirement)", err=True)


def register(app: typer.Typer) -> None:
    """Attach this module's verbs to the main app."""
    app.add_typer(scheduler_app, name="scheduler")
