"""Recorded spot capacity (scheduler/spot_traces.py, zones.py) on the real "Can't Be Late"
traces in ../shared/ref/spot-traces: the loader, the zones, the policies, the planner."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from spotbatch.cli import app
from spotbatch.scheduler.plan import search
from spotbatch.scheduler.pools import PoolConfig
from spotbatch.scheduler.prices import InstancePrice
from spotbatch.scheduler.simulate import Policy, SimConfig, SpotMarket, compare, simulate, standard_policies, \
    zone_aware_policy
from spotbatch.scheduler.spot_traces import SpotTraceError, load_spot_trace, load_spot_traces, zone_capacity
from spotbatch.scheduler.spot_windows import spot_windows
from spotbatch.scheduler.traces import synthetic

REPO = Path(__file__).resolve().parents[2]
REF = REPO.parent / "shared" / "ref" / "spot-traces"  # as tests/k8s_render.py finds ../shared/ref/keda
V100_9 = REF / "availability" / "1-node" / "aws-02-15-2023"
V100_16 = REF / "availability" / "16-node" / "aws-08-27-2023"

pytestmark = pytest.mark.skipif(not REF.is_dir(), reason=f"spot traces not found at {REF} (../shared/ref/spot-traces); "
                                                          "check out the shared reference folder beside the repo")

# p3.2xlarge on-demand list price; spot at 35 % of it (the 30-40 % band the traces' paper reports)
PRICE = InstancePrice("p3.2xlarge", on_demand_per_h=3.06, spot_per_h=1.071, gpus=1, region="us-east-1")
SIM = SimConfig(rows_per_s=100, cold_start_s=120, lag_threshold=10, max_replicas=20, step_s=60, slo_drain_s=1800)
TRACES_ONLY = SpotMarket(interruption_rate_per_h=0.0, events_per_day=0.0)


def diurnal(days: float = 2.0, seed: int = 1):
    return synthetic("diurnal", days=days, step_s=60, seed=seed, mean_rows_per_s=800, rows_per_job=1000)


def test_loader_reads_every_file_in_the_folder():
    files = sorted(REF.rglob("*.json"))
    assert len(files) >= 34
    for f in files:  # each one alone: folders mix zones that repeat across dates
        t = load_spot_trace(f)
        assert t.gap_s > 0 and len(t.data) > 100 and t.data.min() >= 0 and t.data.max() <= t.nodes
        assert t.kind == ("preemption" if "preemption" in f.parts else "availability")
        assert t.nodes == int(next(p for p in f.parts if p.endswith("-node")).split("-")[0])
    for folder in {f.parent for f in files}:  # a folder at once: one zone per file, names unique
        traces = load_spot_traces([folder])
        assert len(traces) == len(list(folder.glob("*.json"))) == len({t.zone for t in traces})
    nine = {t.zone: t for t in load_spot_traces([V100_9])}
    assert len(nine) == 9 and nine["us-east-1a"].gap_s == 195
    assert nine["us-east-1a"].availability == pytest.approx(0.167, abs=0.005)  # the "about 17 %"
    assert nine["us-east-1a"].duration_s / 86_400 == pytest.approx(45.5, abs=0.1)


def test_capacity_scales_one_node_traces_and_keeps_multi_node_readings():
    one = load_spot_traces([V100_9])
    caps = zone_capacity(one, steps=500, step_s=60, replicas_per_zone=7).caps
    assert set(np.unique(caps)) <= {0, 7} and caps.shape == (9, 500)
    default = zone_capacity(one, steps=10, step_s=60, max_replicas=100)
    assert default.replicas_per_zone == (12,) * 9  # ceil(100 / 9): all zones up hold the fleet
    sixteen = load_spot_traces([V100_16])
    z = zone_capacity(sixteen, steps=1000, step_s=300)
    assert np.array_equal(z.caps[0], sixteen[0].data[:1000])  # 300 s steps = the 300 s ticks, as recorded


def test_short_traces_loop_or_the_window_is_aligned(tmp_path):
    sixteen = load_spot_traces([V100_16])  # us-east-2b covers 11.3 days, the others 16.4
    looped = zone_capacity(sixteen, steps=14 * 24 * 60, step_s=60)
    assert looped.looped == ("us-east-2b",) and "looped: us-east-2b" in looped.describe()
    with pytest.raises(SpotTraceError, match="shortest trace"):
        zone_capacity(sixteen, steps=14 * 24 * 60, step_s=60, fit="align")
    res = CliRunner().invoke(app, ["scheduler", "simulate", "--synthetic", "steady", "--days", "14", "--step", "300s",
                                   "--max-replicas", "16", "--spot-trace", str(V100_16), "--spot-trace-fit", "align",
                                   "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["trace"]["days"] == pytest.approx(11.27, abs=0.01) and doc["spot_traces"]["fit"] == "align"
    assert doc["spot_traces"]["looped"] == []


def test_preemption_trace_drops_interrupt_their_share(tmp_path):
    folder = tmp_path / "preemption" / "4-node"
    folder.mkdir(parents=True)
    path = folder / "us-east-1f_v100_1.json"
    path.write_text(json.dumps({"metadata": {"gap_seconds": 120}, "data": [4, 4, 3, 3, 4, 0]}))
    z = zone_capacity([load_spot_trace(path)], steps=6, step_s=120, replicas_per_zone=8)
    assert z.caps[0].tolist() == [8, 8, 6, 6, 8, 0]
    assert z.kill[0].tolist() == [0, 0, 0.25, 0, 0, 1.0]
    real = load_spot_traces([REF / "preemption" / "1-node" / "aws-04-22-2023"])
    assert [t.kind for t in real] == ["preemption"] * 4


def _all_zero(tmp_path) -> list:
    """The 9-zone V100 set with every reading 0: no spot capacity anywhere, ever."""
    out = tmp_path / "zero"
    out.mkdir()
    for f in sorted(V100_9.glob("*.json")):
        doc = json.loads(f.read_text())
        doc["data"] = [0] * len(doc["data"])
        (out / f.name).write_text(json.dumps(doc))
    return load_spot_traces([out])


def test_all_zero_trace_is_all_on_demand_with_fallback_and_misses_without(tmp_path):
    work = diurnal()
    zones = zone_capacity(_all_zero(tmp_path), steps=work.steps, step_s=60, max_replicas=SIM.max_replicas)
    policies = standard_policies(baseline=2, fallback_cap=SIM.max_replicas, spot_max=SIM.max_replicas)
    policies.append(zone_aware_policy(baseline=2, fallback_cap=SIM.max_replicas, spot_max=SIM.max_replicas))
    od, spot, base, fb, aware = compare(work, policies, sim=SIM, market=TRACES_ONLY, price=PRICE, seed=1, zones=zones)
    for r in (fb, aware):  # fallback covers it all: all on-demand cost (within the grace before fallback starts)
        assert r.cost_spot == 0 and r.cost == pytest.approx(od.cost, rel=0.05)
        assert r.miss_fraction <= 0.001 and r.fallback_hours > 0  # (none while the baseline alone is enough)
    assert spot.cost == 0 and spot.miss_fraction > 0.9  # nothing ever runs
    assert base.cost_spot == 0 and base.slo_misses > 0


def test_same_seed_same_result_on_traces():
    work = diurnal(days=1.5)
    zones = zone_capacity(load_spot_traces([V100_9]), steps=work.steps, step_s=60, start_s=5 * 86_400,
                          max_replicas=SIM.max_replicas)
    market = SpotMarket(interruption_rate_per_h=0.05, events_per_day=0.0)
    policy = zone_aware_policy(baseline=2, fallback_cap=10, spot_max=20)
    a, b, c = (simulate(work, policy, sim=SIM, market=market, price=PRICE, seed=s, zones=zones) for s in (4, 4, 5))
    assert a == b
    assert (a.cost, a.interruptions) != (c.cost, c.interruptions)


def test_zone_aware_placement_beats_spreading_on_the_v100_zones():
    """us-east-1a has spot 17 % of the time: spreading parks a ninth of the pool there."""
    work = diurnal(days=3)
    zones = zone_capacity(load_spot_traces([V100_9]), steps=work.steps, step_s=60, max_replicas=SIM.max_replicas)
    spread = Policy("spread", PoolConfig(baseline=2, spot_max=20, fallback_cap=10))
    aware = replace(spread, name="aware", placement="zone-aware")
    r_spread, r_aware = compare(work, [spread, aware], sim=SIM, market=TRACES_ONLY, price=PRICE, seed=1, zones=zones)
    assert r_aware.gpu_hours_spot > r_spread.gpu_hours_spot  # it gets more of the spot that was there
    assert r_aware.cost < r_spread.cost and r_aware.fallback_hours < r_spread.fallback_hours


def test_planners_pick_meets_the_slo_on_a_held_out_window():
    work = diurnal(days=2)
    traces = load_spot_traces([V100_9])
    windows = spot_windows(traces, starts_s=[0, 10 * 86_400, 20 * 86_400], steps=work.steps, step_s=60, fit="loop",
                           replicas_per_zone=None, max_replicas=SIM.max_replicas)
    plan = search(work, sim=SIM, market=TRACES_ONLY, price=PRICE, seeds=[1], slo_drain_s=1800, max_miss_fraction=0.001,
                  baselines=[0, 2, 5], fallback_caps=[5, 10, 20], windows=windows, zone_counts=[3, 9])
    best = plan.recommended
    assert best is not None and best.cost < plan.reference.cost
    assert len(best.results) == 3  # judged on every window
    held_out = zone_capacity(traces, steps=work.steps, step_s=60, start_s=35 * 86_400,
                             max_replicas=SIM.max_replicas).subset([traces.index(t) for t in traces
                                                                    if t.zone in best.zones])
    again = simulate(work, Policy("pick", best.pools, best.placement), sim=SIM, market=TRACES_ONLY, price=PRICE, seed=1,
                     zones=held_out)
    assert again.miss_fraction <= plan.max_miss_fraction


def test_cli_simulate_on_traces_json_and_plot(tmp_path):
    png = tmp_path / "capacity.png"
    res = CliRunner().invoke(app, ["scheduler", "simulate", "--synthetic", "diurnal", "--days", "1", "--step", "60s",
                                   "--max-replicas", "20", "--spot-trace", str(V100_9 / "us-west-2a_v100_1.json"),
                                   "--spot-trace", str(V100_9 / "us-east-1a_v100_1.json"), "--replicas-per-zone", "10",
                                   "--plot", str(png), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    names = [p["policy"] for p in doc["policies"]]
    assert len(names) == 5 and names[-1].startswith("zone-aware")
    assert doc["spot_traces"]["zones"] == ["us-west-2a", "us-east-1a"] and doc["spot_traces"]["replicas_per_zone"] == [10, 10]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("not json", "is not JSON"),
    (json.dumps({"data": [1]}), "lacks metadata"),
    (json.dumps({"metadata": {"gap_seconds": 0}, "data": [1]}), "gap_seconds must be"),
    (json.dumps({"metadata": {"gap_seconds": 60}, "data": [1, -1]}), "integers >= 0"),
])
def test_cli_bad_spot_traces_exit_2_with_one_line(tmp_path, content, match):
    path = tmp_path / "us-east-1a_v100_1.json"
    if content is not None:
        path.write_text(content)
    for verb in (["simulate"], ["plan", "--slo-drain", "30m"]):
        res = CliRunner().invoke(app, ["scheduler", *verb, "--synthetic", "steady", "--days", "0.2", "--spot-trace", str(path)])
        assert res.exit_code == 2 and match in res.output
        assert len([line for line in res.output.splitlines() if line.startswith("error")]) == 1


def test_cli_spot_trace_conflicts():
    runner = CliRunner()
    base = ["scheduler", "simulate", "--synthetic", "steady", "--days", "0.2", "--spot-trace", str(V100_9)]
    res = runner.invoke(app, [*base, "--spot-capacity", "3"])
    assert res.exit_code == 2 and "--spot-capacity" in res.output
    res = runner.invoke(app, [*base, "--spot-trace-fit", "stretch"])
    assert res.exit_code == 2 and "loop or align" in res.output
    res = runner.invoke(app, [*base, "--plot", "out.jpg"])
    assert res.exit_code == 2 and ".png" in res.output


def test_cli_plan_on_traces_names_zones_placement_and_margin(tmp_path):
    res = CliRunner().invoke(app, ["scheduler", "plan", "--synthetic", "diurnal", "--days", "1", "--step", "120s",
                                   "--mean-rows-per-s", "800", "--max-replicas", "20", "--slo-drain", "30m",
                                   "--spot-trace", str(V100_9), "--trace-starts", "0,20d", "--baselines", "0,2",
                                   "--fallback-caps", "10,20", "--zone-counts", "2,9", "--placements", "zone-aware",
                                   "--seeds", "1", "--jobs", "1", "--plot", str(tmp_path / "pick.png"), "--json"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pick.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads(res.stdout)
    rec = doc["recommended"]
    assert rec["placement"] == "zone-aware" and len(rec["zones"]) in (2, 9)
    assert rec["zones"][:2] == ["us-west-2b", "us-west-2c"]  # the most available V100 zones over those windows
    assert doc["margin"]["worst_miss_fraction"] <= doc["max_miss_fraction"]
    assert len(doc["spot_trace_windows"]) == 2 and doc["candidates"] == 2 * 2 * 2
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(res.stdout)
    from spotbatch.cli.scheduler import _apply_setting

    pools, total, _ = _apply_setting(plan_file, None, None, None, None)  # apply's reading of it (notes the zones)
    assert total == 20 and pools.fallback_cap == rec["fallback_cap"]
    bad = CliRunner().invoke(app, ["scheduler", "plan", "--synthetic", "steady", "--slo-drain", "30m", "--spot-trace",
                                   str(V100_9), "--placements", "anywhere"])
    assert bad.exit_code == 2 and "--placements" in bad.output
