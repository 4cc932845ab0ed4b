"""The cost report: the usage ledger x prices, for a time window.

Cost of a record = its seconds alive inside the window / 3600 x its pool's hourly price
for its instance type (spot price for the spot pool, on-demand for on-demand). The
"all on-demand" figure prices the same seconds at on-demand rates; savings are the
difference. An instance type with no price is an error (UnpricedError) naming the type
and the fix: a report that silently leaves out machines would understate the bill.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from spotbatch.scheduler.ledger import POOLS, Ledger, Usage, Window, read_ledger
from spotbatch.scheduler.prices import InstancePrice, demo_prices

__all__ = ["PoolCost", "CostReport", "UnpricedError", "compute_report", "report_json", "report_csv",
           "render_table", "plot_report", "report_for_demo", "report_from_json", "auto_bucket_s", "empty_note",
           "COLUMNS"]

TOTAL = "total"
# Column order of the table and the CSV (the JSON carries the same keys per pool).
COLUMNS = ("pool", "workers", "instance_hours", "gpu_hours", "busy_fraction", "cost", "on_demand_cost", "savings",
           "rows", "jobs", "cost_per_1k_rows", "interruptions", "rows_recomputed")
_NICE_BUCKETS_S = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86400)


class UnpricedError(ValueError):
    """Usage on an instance type the prices do not cover; one line with the fix."""


@dataclass(frozen=True)
class PoolCost:
    pool: str
    workers: int
    instance_hours: float
    gpu_hours: float
    busy_fraction: float | None  # None: no seconds alive
    cost: float
    on_demand_cost: float  # the same seconds at on-demand prices
    savings: float
    rows: float
    jobs: float
    cost_per_1k_rows: float | None  # None: no rows
    interruptions: int
    rows_recomputed: int


@dataclass(frozen=True)
class CostReport:
    since: float | None
    until: float | None
    pools: list[PoolCost]
    total: PoolCost
    savings_fraction: float | None  # savings / all-on-demand cost
    prices_source: str
    bucket_s: float
    timeline: list[dict[str, Any]] = field(default_factory=list)  # {"start", "cost": {pool}, "replicas": {pool}}
    duplicates: int = 0
    skipped: int = 0
    malformed: int = 0


def compute_report(ledger: Ledger, prices: Mapping[str, InstancePrice], window: Window, *,
                   prices_source: str = "prices file", bucket_s: float | None = None) -> CostReport:
    """Price the ledger's usage inside ``window``; UnpricedError on an unknown type."""
    sums = ledger.totals(window)
    _check_priced(sums, prices, prices_source)
    shown = [pool for pool in POOLS if pool != "unknown" or any(p == pool for p, _ in sums)]
    pools = [_pool_cost(pool, {t: u for (p, t), u in sums.items() if p == pool}, prices) for pool in shown]
    total = _total(pools, workers=len(set().union(*(u.workers for u in sums.values()))))
    span = ledger.span(window)
    bucket = bucket_s or auto_bucket_s(span[1] - span[0] if span else 0.0)
    return CostReport(
        since=window.since, until=window.until, pools=pools, total=total,
        savings_fraction=total.savings / total.on_demand_cost if total.on_demand_cost > 0 else None,
        prices_source=prices_source, bucket_s=bucket, timeline=_timeline(ledger, prices, window, bucket, shown),
        duplicates=ledger.duplicates, skipped=ledger.skipped, malformed=ledger.malformed,
    )


def _check_priced(sums: Mapping[tuple[str, str], Usage], prices: Mapping[str, InstancePrice], source: str) -> None:
    missing = sorted({t for (_, t) in sums} - set(prices))
    if missing:
        raise UnpricedError(f"instance type {missing[0]!r} has usage but no price in {source}"
                            f"{f' (also unpriced: {missing[1:]})' if missing[1:] else ''}; add "
                            f"'{missing[0]}: {{on_demand_per_h: ..., spot_per_h: ..., gpus: ..., region: ...}}' "
                            f"to the prices file and pass it with --prices")


def _pool_cost(pool: str, by_type: Mapping[str, Usage], prices: Mapping[str, InstancePrice]) -> PoolCost:
    alive = sum(u.alive_s for u in by_type.values())
    busy = sum(u.busy_s for u in by_type.values())
    cost = sum(u.alive_s / 3600 * prices[t].per_h(pool) for t, u in by_type.items())
    od_cost = sum(u.alive_s / 3600 * prices[t].on_demand_per_h for t, u in by_type.items())
    rows = sum(u.rows for u in by_type.values())
    return PoolCost(
        pool=pool, workers=len(set().union(*(u.workers for u in by_type.values()))),
        instance_hours=alive / 3600, gpu_hours=sum(u.gpu_s for u in by_type.values()) / 3600,
        busy_fraction=busy / alive if alive > 0 else None, cost=cost, on_demand_cost=od_cost,
        savings=od_cost - cost, rows=rows, jobs=sum(u.jobs for u in by_type.values()),
        cost_per_1k_rows=cost / rows * 1000 if rows > 0 else None,
        interruptions=sum(u.interruptions for u in by_type.values()),
        rows_recomputed=sum(u.rows_recomputed for u in by_type.values()),
    )


def _total(pools: list[PoolCost], *, workers: int) -> PoolCost:
    hours = sum(p.instance_hours for p in pools)
    busy_h = sum(p.instance_hours * (p.busy_fraction or 0.0) for p in pools)
    cost, od_cost, rows = (sum(getattr(p, k) for p in pools) for k in ("cost", "on_demand_cost", "rows"))
    return PoolCost(
        pool=TOTAL, workers=workers, instance_hours=hours, gpu_hours=sum(p.gpu_hours for p in pools),
        busy_fraction=busy_h / hours if hours > 0 else None, cost=cost, on_demand_cost=od_cost,
        savings=od_cost - cost, rows=rows, jobs=sum(p.jobs for p in pools),
        cost_per_1k_rows=cost / rows * 1000 if rows > 0 else None,
        interruptions=sum(p.interruptions for p in pools), rows_recomputed=sum(p.rows_recomputed for p in pools),
    )


def auto_bucket_s(span_s: float, *, buckets: int = 48) -> float:
    """A round bucket width giving about ``buckets`` points over ``span_s``."""
    for width in _NICE_BUCKETS_S:
        if span_s / width <= buckets:
            return float(width)
    return float(_NICE_BUCKETS_S[-1])


def _timeline(ledger: Ledger, prices: Mapping[str, InstancePrice], window: Window, bucket_s: float,
              pools: Iterable[str] = POOLS) -> list[dict]:
    """Per bucket and pool: cost, and replicas (mean workers alive = alive s / width)."""
    points = []
    pools = tuple(pools)
    for start, sums in ledger.timeline(window, bucket_s):
        cost = dict.fromkeys(pools, 0.0)
        replicas = dict.fromkeys(pools, 0.0)
        for (pool, itype), alive_s in sums.items():
            cost[pool] += alive_s / 3600 * prices[itype].per_h(pool)
            replicas[pool] += alive_s / bucket_s
        points.append({"start": start, "cost": cost, "replicas": replicas})
    return points


# ---- output ----------------------------------------------------------------------


def report_json(report: CostReport) -> dict[str, Any]:
    """The whole report as plain JSON types (the same numbers as the table and CSV)."""
    body = asdict(report)
    body["pools"] = {p["pool"]: p for p in body["pools"]}
    body["since_iso"], body["until_iso"] = _iso(report.since), _iso(report.until)
    return body


def report_from_json(body: Mapping[str, Any]) -> CostReport:
    """The inverse of report_json (for callers that keep only the JSON, like the demo)."""
    fields = {k: v for k, v in body.items() if k in CostReport.__dataclass_fields__}
    fields["pools"] = [PoolCost(**p) for p in body["pools"].values()]
    fields["total"] = PoolCost(**body["total"])
    return CostReport(**fields)


def report_csv(report: CostReport) -> str:
    """One row per pool plus the total, columns COLUMNS, full precision."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in [*report.pools, report.total]:
        writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    return buf.getvalue()


def render_table(report: CostReport):
    """A rich Table, one column per pool and the total (fits 80 columns), then the
    savings against all on-demand in the caption."""
    from rich.table import Table

    window = f"{_iso(report.since) or 'beginning'} .. {_iso(report.until) or 'now'}"
    table = Table(title=f"spotbatch cost report\n{window}", caption=_caption(report))
    table.add_column("")
    columns = [*report.pools, report.total]
    for col in columns:
        table.add_column(col.pool, justify="right")
    for label, fmt in _TABLE_ROWS:
        table.add_row(label, *(fmt(col) for col in columns), end_section=label in ("busy", "savings $"))
    return table


def _opt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


_TABLE_ROWS = (
    ("workers", lambda c: str(c.workers)),
    ("GPU-hours", lambda c: f"{c.gpu_hours:.3f}"),
    ("instance-hours", lambda c: f"{c.instance_hours:.3f}"),
    ("busy", lambda c: _opt(c.busy_fraction, ".0%")),
    ("cost $", lambda c: f"{c.cost:.4f}"),
    ("all on-demand $", lambda c: f"{c.on_demand_cost:.4f}"),
    ("savings $", lambda c: f"{c.savings:.4f}"),
    ("rows", lambda c: f"{c.rows:,.0f}"),
    ("$ / 1k rows", lambda c: _opt(c.cost_per_1k_rows, ".4f")),
    ("interruptions", lambda c: str(c.interruptions)),
    ("rows recomputed", lambda c: f"{c.rows_recomputed:,}"),
)


def _caption(report: CostReport) -> str:
    saved = report.total.savings
    pct = "" if report.savings_fraction is None else f" ({report.savings_fraction:.1%})"
    notes = [f"savings vs all on-demand: ${saved:.4f}{pct}", f"prices: {report.prices_source}"]
    if report.duplicates or report.malformed:
        notes.append(f"ignored {report.duplicates} redelivered and {report.malformed} malformed records")
    return "; ".join(notes)


def plot_report(report: CostReport, path: str | Path) -> Path:
    """Write a PNG: cost per bucket and replicas per pool over time (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")  # no display here or in CI
    import matplotlib.pyplot as plt

    times = [datetime.fromtimestamp(p["start"], tz=timezone.utc) for p in report.timeline]
    fig, (ax_cost, ax_rep) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    for pool in (p.pool for p in report.pools):
        ax_cost.step(times, [p["cost"].get(pool, 0.0) for p in report.timeline], where="post", label=pool)
        ax_rep.step(times, [p["replicas"].get(pool, 0.0) for p in report.timeline], where="post", label=pool)
    # parse_math=False: "$" is a dollar here, not matplotlib mathtext
    ax_cost.set_ylabel(f"cost ($) per {_width(report.bucket_s)}", parse_math=False)
    ax_rep.set_ylabel("replicas (mean alive)")
    ax_rep.set_xlabel("time (UTC)")
    note = empty_note(report)
    if note:
        for ax in (ax_cost, ax_rep):
            ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", parse_math=False)
    else:
        ax_cost.legend()
    ax_cost.set_title(f"spotbatch cost: ${report.total.cost:.2f}, saved ${report.total.savings:.2f} vs all on-demand",
                      parse_math=False)
    fig.autofmt_xdate()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _width(seconds: float) -> str:
    """A bucket width as people write it: "5 s", "90 s", "15 min", "2.5 h"."""
    if seconds >= 3600:
        return f"{seconds / 3600:.4g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:.4g} min"
    return f"{seconds:.4g} s"


def empty_note(report: CostReport) -> str | None:
    """A line saying the window holds no usage record (None if it holds some)."""
    if report.total.workers or report.total.instance_hours:
        return None
    window = f"{_iso(report.since) or 'the beginning'} .. {_iso(report.until) or 'now'}"
    return f"no usage records in this window ({window})"


def _iso(epoch: float | None) -> str | None:
    if epoch is None or not math.isfinite(epoch):
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def report_for_demo(bootstrap: str, usage_topic: str,
                    prices: Mapping[str, InstancePrice] | None = None) -> dict[str, Any]:
    """The demo's closing report over its whole usage topic, as report_json's dict
    (print it with ``render_table(report_from_json(body))``).

    Without ``prices``, the built-in illustrative demo prices (instance type "local").
    """
    source = "prices given" if prices is not None else "built-in illustrative demo prices (not a quote)"
    report = compute_report(read_ledger(bootstrap, usage_topic), prices if prices is not None else demo_prices(),
                            Window(), prices_source=source)
    return report_json(report)
