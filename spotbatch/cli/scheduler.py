"""``spotbatch scheduler ...``: prices, report and apply here; simulate and plan in
spotbatch.cli.simulate.

Keep imports of heavy modules (kafka, boto3, matplotlib, kubernetes) inside the
command bodies: ``spotbatch --help`` must stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, cast

import typer

from spotbatch.cli import simulate
from spotbatch.cli.common import BootstrapOpt, ConfigOpt, JsonOpt, err, fail, load_or_exit, out
from spotbatch.kafka_security import client_options

__all__ = ["register", "scheduler_app"]

scheduler_app = typer.Typer(no_args_is_help=True, help="Hybrid spot/on-demand scheduler: costs, plans, reports.")


def register(app: typer.Typer) -> None:
    """Attach ``spotbatch scheduler`` (and its verbs, in --help order) to the main app."""
    scheduler_app.command("prices")(prices)
    scheduler_app.command("report")(report)
    simulate.register(scheduler_app)
    scheduler_app.command("apply")(apply)
    app.add_typer(scheduler_app, name="scheduler")


# ---- prices and report (the cost side) ------------------------------------------------


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
        fail(str(exc))
    if as_json:
        print(json.dumps({t: {k: v for k, v in vars(p).items() if k != "instance_type"} for t, p in table.items()}))
        return
    out.print(_prices_table(table, str(file)))


def _refresh(file: Path, region: Optional[str], types: Optional[str], spot_stat: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from spotbatch.scheduler.prices import PricesError, load_prices, save_prices
    from spotbatch.scheduler.pricing_aws import DEFAULT_TYPES, PricingError, aws_clients, refresh_prices

    if not region:
        fail("--refresh needs --region, e.g. --region us-east-1")
    if spot_stat not in ("mean", "min"):
        fail(f"--spot-stat {spot_stat!r} is not 'mean' or 'min'; pass one of those")
    stat = cast(Literal["mean", "min"], spot_stat)
    wanted = [t.strip() for t in types.split(",") if t.strip()] if types else None
    if wanted is None:
        try:
            wanted = sorted(load_prices(file)) if file.is_file() else list(DEFAULT_TYPES)
        except PricesError:
            wanted = list(DEFAULT_TYPES)
    ec2, pricing = aws_clients(region)
    try:
        fresh = refresh_prices(wanted, region, ec2=ec2, pricing=pricing, spot_stat=stat)
    except PricingError as exc:
        fail(str(exc), code=1)
    except (BotoCoreError, ClientError) as exc:
        fail(f"AWS refused the price query ({exc}); configure credentials (AWS_PROFILE or "
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


def report(
    bootstrap: Optional[str] = BootstrapOpt,
    usage_topic: Optional[str] = typer.Option(None, help="Usage topic [env SPOTBATCH_USAGE_TOPIC]."),
    prices_file: Optional[Path] = typer.Option(None, "--prices", help="Prices file (default: built-in illustrative demo prices for type 'local')."),
    since: str = typer.Option("-24h", help="Window start: ISO 8601 (UTC if no zone) or relative like -24h, -7d; 'all' for no start."),
    until: str = typer.Option("now", help="Window end: ISO 8601, relative, or now."),
    bucket_s: Optional[float] = typer.Option(None, min=1, help="Width of the over-time buckets (default: about 48 over the window)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the per-pool rows as CSV."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG of cost and replicas per pool over time."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Cost per pool from the usage ledger and prices: GPU-hours, busy, $, $/1k rows, savings."""
    from spotbatch.scheduler import report as rep
    from spotbatch.scheduler.ledger import LedgerError, Window, read_ledger

    if as_json and as_csv:
        fail("--json and --csv both given; pick one output format")
    if plot is not None and plot.suffix.lower() != ".png":
        fail(f"--plot {plot} must name a .png file")
    settings = load_or_exit(config, kafka_bootstrap=bootstrap, usage_topic=usage_topic)
    table, source = _report_prices(prices_file)
    try:
        window = Window.parse(None if since == "all" else since, until)
        ledger = read_ledger(settings.kafka_bootstrap, settings.usage_topic, window=window,
                             client_options=client_options(settings))
        result = rep.compute_report(ledger, table, window, prices_source=source, bucket_s=bucket_s)
    except (LedgerError, rep.UnpricedError) as exc:
        fail(str(exc))
    if plot is not None:
        rep.plot_report(result, plot)
    note = rep.empty_note(result)
    if as_json:
        print(json.dumps(rep.report_json(result)))
    elif as_csv:
        print(rep.report_csv(result), end="")
    elif not note:
        out.print(rep.render_table(result))
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
        fail(str(exc))


# ---- apply (a plan's setting -> the ScaledObjects) -------------------------------------


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
        fail(str(exc), code=1)
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
            fail("--plan and --baseline/--fallback-cap/--max-replicas/--spot-max both given; pass one or the other")
        try:
            doc = json.loads(plan_file.read_text())
            setting = setting_from_plan(doc, str(plan_file))
            _note_zones(doc["recommended"])
            return setting
        except FileNotFoundError:
            fail(f"plan file {plan_file} does not exist; make one with `spotbatch scheduler plan ... --json > {plan_file}`")
        except (json.JSONDecodeError, PlanError) as exc:
            fail(f"{plan_file}: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc))
    if baseline is None or max_replicas is None:
        fail("pass --plan FILE, or --baseline N and --max-replicas N (and optionally --fallback-cap, --spot-max)")
    return PoolConfig(baseline=baseline, fallback_cap=fallback_cap or 0,
                      spot_max=max_replicas if spot_max is None else spot_max), max_replicas, None


def _note_zones(rec: dict) -> None:
    """A plan made on spot traces also names zones and a placement: apply cannot write
    those (they belong to the spot node pool), so say so rather than drop them silently."""
    if rec.get("zones") or rec.get("placement", "spread") != "spread":
        typer.echo(f"note: the plan's spot placement ({rec.get('placement', 'spread')}) and zones "
                   f"({', '.join(rec.get('zones') or []) or 'all'}) are not written by apply; set them on the spot "
                   f"node pool (e.g. a topology.kubernetes.io/zone requirement)", err=True)
