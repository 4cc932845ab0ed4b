"""The ``--spot-trace`` options of ``scheduler simulate`` and ``plan`` (spotbatch.cli.simulate),
and how they turn into zones (spotbatch.scheduler.spot_traces); bad input exits 2 with one
line naming the fix."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from spotbatch.cli.common import fail

__all__ = ["SpotTraceOpt", "ReplicasPerZoneOpt", "FitOpt", "ZoneWindowOpt", "TraceStartOpt", "TraceStartsOpt",
           "ZoneCountsOpt", "PlacementsOpt", "PlotOpt", "PlanPlotOpt", "load_or_fail", "plot_pick", "fit_workload", "simulate_zones",
           "plan_windows", "placements_or_fail", "check_plot"]

SpotTraceOpt = typer.Option(
    None, "--spot-trace",
    help="Recorded spot capacity: a trace JSON file ({metadata: {gap_seconds}, data: [...]}, e.g. from "
         "../shared/ref/spot-traces) or a folder of them; repeat for more. Each file is one zone (named by the file "
         "name before '_'); spot replicas spread over the zones. availability/ traces: a reading is how many "
         "instances could be had at that tick; it caps the zone at reading / N x --replicas-per-zone replicas (N: "
         "the N-node folder, else the largest reading) and reclaims what runs above that. preemption/ traces: a "
         "reading is how many of the recorder's N instances were alive; it caps the zone the same way and a drop "
         "from v to v' interrupts (v - v') / v of the zone's replicas. Replaces --events-per-month and --shortage; "
         "--interruptions-per-month still applies on top (0 for the traces alone).")
ReplicasPerZoneOpt = typer.Option(
    None, "--replicas-per-zone", min=1,
    help="Spot replicas a zone holds at a full reading (default: 1-node traces ceil(--max-replicas / zones), "
         "multi-node traces their own N).")
FitOpt = typer.Option(
    "loop", "--spot-trace-fit",
    help="A trace shorter than the window: 'loop' repeats it from its start (the output says which zones "
         "looped); 'align' starts every trace together and cuts the window to what all of them cover.")
ZoneWindowOpt = typer.Option("6h", "--zone-window", help="Zone-aware placement ranks zones by their availability over this much history.")
TraceStartOpt = typer.Option("0", "--trace-start", help="Where in the spot traces the window starts, e.g. 15d.")
TraceStartsOpt = typer.Option(
    "0", "--trace-starts",
    help="Comma-separated starts in the spot traces, e.g. 0,15d: each is a window a setting must meet the SLO on.")
ZoneCountsOpt = typer.Option(
    None, "--zone-counts",
    help="With --spot-trace: comma-separated zone counts to try, each the best N zones on the windows (default 1, "
         "a third, two thirds, all).")
PlacementsOpt = typer.Option("spread,zone-aware", "--placements", help="With --spot-trace: spot placements to try.")
PlotOpt = typer.Option(None, "--plot", help="Also write a PNG of spot capacity, replicas per pool and backlog over time.")
PlanPlotOpt = typer.Option(None, "--plot", help="Also write a PNG of the recommended setting on the first trace window: "
                                                "spot capacity, replicas per pool and backlog over time.")


def load_or_fail(paths: Optional[List[Path]], fit: str, spot_capacity: Optional[int]):
    """The traces (or None without --spot-trace)."""
    from spotbatch.scheduler.spot_traces import FITS, SpotTraceError, load_spot_traces

    if not paths:
        return None
    if fit not in FITS:
        fail(f"--spot-trace-fit {fit!r} is not one of {', '.join(FITS)}; pass --spot-trace-fit loop or align")
    if spot_capacity is not None:
        fail("--spot-capacity and --spot-trace both cap spot; drop --spot-capacity (the traces say what was there)")
    try:
        return load_spot_traces(paths)
    except SpotTraceError as exc:
        fail(str(exc))


def fit_workload(workload, traces, fit: str, starts_s: list[float]):
    """With fit 'align', cut the workload to what every trace covers from the latest start."""
    from spotbatch.scheduler.spot_traces import common_span_s
    from spotbatch.scheduler.traces import Trace

    if fit != "align":
        return workload
    span = common_span_s(traces, max(starts_s))
    steps = int(span // workload.step_s)
    if steps < 1:
        fail(f"the spot traces end before --trace-start {max(starts_s) / 86_400:g}d; start earlier or use --spot-trace-fit loop")
    if steps >= workload.steps:
        return workload
    return Trace(step_s=workload.step_s, jobs=workload.jobs[:steps], rows=workload.rows[:steps],
                 name=f"{workload.name}, cut to {steps * workload.step_s / 86_400:.2f}d (fit align)")


def simulate_zones(traces, workload, *, start: str, fit: str, replicas_per_zone, max_replicas: int, duration):
    """(workload, ZoneCapacity) for one window, or (workload, None) without traces."""
    from spotbatch.scheduler.spot_traces import SpotTraceError, zone_capacity

    if traces is None:
        return workload, None
    start_s = duration(start, "--trace-start")
    workload = fit_workload(workload, traces, fit, [start_s])
    try:
        return workload, zone_capacity(traces, steps=workload.steps, step_s=workload.step_s, start_s=start_s, fit=fit,
                                       replicas_per_zone=replicas_per_zone, max_replicas=max_replicas)
    except SpotTraceError as exc:
        fail(str(exc))


def plan_windows(traces, workload, *, starts: str, fit: str, replicas_per_zone, max_replicas: int, duration):
    """(workload, SpotWindows) for the planner, or (workload, None) without traces."""
    from spotbatch.scheduler.spot_traces import SpotTraceError
    from spotbatch.scheduler.spot_windows import spot_windows

    if traces is None:
        return workload, None
    starts_s = [duration(t.strip(), "--trace-starts") for t in starts.split(",") if t.strip()]
    if not starts_s:
        fail("--trace-starts needs at least one start, e.g. --trace-starts 0,15d")
    workload = fit_workload(workload, traces, fit, starts_s)
    try:
        return workload, spot_windows(traces, starts_s=starts_s, steps=workload.steps, step_s=workload.step_s, fit=fit,
                                      replicas_per_zone=replicas_per_zone, max_replicas=max_replicas)
    except SpotTraceError as exc:
        fail(str(exc))


def placements_or_fail(text: str) -> list[str]:
    from spotbatch.scheduler.zones import PLACEMENTS

    chosen = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in chosen if p not in PLACEMENTS]
    if not chosen or bad:
        fail(f"--placements {text!r}: pick from {', '.join(PLACEMENTS)}, e.g. --placements spread,zone-aware")
    return chosen


def check_plot(plot: Optional[Path]) -> None:
    if plot is not None and plot.suffix.lower() != ".png":
        fail(f"--plot {plot} must name a .png file, e.g. --plot capacity.png")


def plot_pick(path: Path, best, workload, *, sim, market, price, seed: int, windows) -> None:
    """``plan --plot``: re-simulate the recommendation (first window, its zones) over time."""
    from spotbatch.scheduler import simulate as sm
    from spotbatch.scheduler.sim_plot import plot_timelines

    zones = windows.capacity(0, len(best.zones)) if windows is not None else None
    name = f"{best.placement} {best.pools.baseline} + fallback {best.pools.fallback_cap}"
    _, timeline = sm.simulate_timeline(workload, sm.Policy(name, best.pools, best.placement), sim=sim, market=market,
                                       price=price, seed=seed, zones=zones)
    where = zones.describe() if zones is not None else "synthetic market"
    plot_timelines(path, [(name, timeline)], title=f"plan's pick on {workload.name}, seed {seed}; {where}")
