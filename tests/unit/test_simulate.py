"""The simulator (scheduler/simulate.py) and its traces: closed forms, seeds, and the
directions the policies must move the figures in."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from spotbatch.cli import app
from spotbatch.scheduler.pools import PoolConfig
from spotbatch.scheduler.prices import InstancePrice
from spotbatch.scheduler.simulate import Policy, SimConfig, SpotMarket, compare, simulate, standard_policies
from spotbatch.scheduler.traces import TraceError, load_csv, parse_duration_s, synthetic

PRICE = InstancePrice("g5.xlarge", on_demand_per_h=1.006, spot_per_h=0.3622, gpus=4, region="us-east-1")
SIM = SimConfig(rows_per_s=100, cold_start_s=120, lag_threshold=30, max_replicas=20, step_s=30, slo_drain_s=1800)
CALM = SpotMarket(interruption_rate_per_h=0.0, events_per_day=0.0)


def steady(days: float = 1.0, rows_per_s: float = 500, seed: int = 1):
    return synthetic("steady", days=days, step_s=30, seed=seed, mean_rows_per_s=rows_per_s, rows_per_job=1000)


def test_closed_form_constant_load_no_interruptions():
    """A fixed fleet under a load it keeps up with: cost = replicas x hours x price."""
    trace = steady(days=2)
    hours = trace.duration_s / 3600
    fixed_od = Policy("6 on-demand", PoolConfig(baseline=6, spot_max=0))
    r = simulate(trace, fixed_od, sim=SIM, market=CALM, price=PRICE, seed=3)
    assert r.cost == pytest.approx(6 * hours * PRICE.on_demand_per_h, rel=1e-12)
    assert r.gpu_hours_on_demand == pytest.approx(6 * hours * PRICE.gpus, rel=1e-12)
    assert r.gpu_hours_spot == 0 and r.rows_recomputed == 0 and r.interruptions == 0
    assert r.slo_misses == 0 and r.backlog_rows_at_end < 1


def test_lag_policy_settles_on_the_load():
    """500 rows/s at 100 rows/s per replica: the all on-demand fleet settles near 5."""
    trace = steady(days=1)
    r = simulate(trace, standard_policies(baseline=0, fallback_cap=0, spot_max=20)[0], sim=SIM, market=CALM,
                 price=PRICE, seed=1)
    mean_replicas = r.gpu_hours_on_demand / PRICE.gpus / (trace.duration_s / 3600)
    assert 5 <= mean_replicas <= 7
    assert r.slo_misses == 0


def test_same_seed_same_result_other_seed_differs():
    trace = synthetic("diurnal", days=1.5, step_s=30, seed=4, mean_rows_per_s=500, rows_per_job=1000)
    market = SpotMarket(interruption_rate_per_h=0.02, events_per_day=1, event_kill_fraction=0.5)
    policy = standard_policies(baseline=1, fallback_cap=5, spot_max=20)[3]
    a = simulate(trace, policy, sim=SIM, market=market, price=PRICE, seed=11)
    b = simulate(trace, policy, sim=SIM, market=market, price=PRICE, seed=11)
    c = simulate(trace, policy, sim=SIM, market=market, price=PRICE, seed=12)
    assert a == b
    assert (a.cost, a.interruptions, a.rows_recomputed) != (c.cost, c.interruptions, c.rows_recomputed)


def test_more_interruptions_recompute_more_rows():
    trace = steady(days=1)
    policy = Policy("all spot", PoolConfig(baseline=0, spot_max=20))
    recomputed = []
    for rate in (0.0, 0.03, 0.3):
        market = SpotMarket(interruption_rate_per_h=rate)
        recomputed.append(simulate(trace, policy, sim=SIM, market=market, price=PRICE, seed=5).rows_recomputed)
    assert recomputed[0] == 0
    assert recomputed[0] < recomputed[1] < recomputed[2]


def test_fallback_reduces_slo_misses_when_spot_vanishes():
    """Spot reclaimed whole, then no capacity for hours: the fallback covers the gap."""
    trace = steady(days=2)
    vanish = SpotMarket(interruption_rate_per_h=0.0, events_per_day=1.5, event_kill_fraction=1.0, shortage_mean_s=4 * 3600)
    plain, fallback = standard_policies(baseline=1, fallback_cap=20, spot_max=20)[2:]
    r_plain = simulate(trace, plain, sim=SIM, market=vanish, price=PRICE, seed=2)
    r_fb = simulate(trace, fallback, sim=SIM, market=vanish, price=PRICE, seed=2)
    assert r_plain.interruptions > 0  # the scenario did hit
    assert r_plain.slo_misses > 0
    assert r_fb.slo_misses < r_plain.slo_misses / 10
    assert r_fb.fallback_hours > 0 and r_fb.cost_on_demand > r_plain.cost_on_demand


def test_compare_sees_the_same_market_events():
    trace = steady(days=1)
    market = SpotMarket(interruption_rate_per_h=0.0, events_per_day=8, event_kill_fraction=1.0, shortage_mean_s=600)
    results = compare(trace, standard_policies(baseline=2, fallback_cap=4, spot_max=20), sim=SIM, market=market,
                      price=PRICE, seed=9)
    on_demand, all_spot = results[0], results[1]
    assert on_demand.interruptions == 0 and all_spot.interruptions > 0
    assert all_spot.cost < on_demand.cost


def test_spot_capacity_shortage_leaves_work_undone():
    trace = steady(days=1)
    starved = SpotMarket(interruption_rate_per_h=0.0, spot_capacity=2)
    r = simulate(trace, Policy("all spot", PoolConfig(baseline=0, spot_max=20)), sim=SIM, market=starved, price=PRICE, seed=1)
    assert r.peak_replicas <= 2
    assert r.slo_misses > 0 and r.backlog_rows_at_end > 0


def test_trace_step_must_match():
    with pytest.raises(ValueError, match="step"):
        simulate(steady(), standard_policies(baseline=0, fallback_cap=0, spot_max=2)[0], sim=replace(SIM, step_s=10),
                 market=CALM, price=PRICE, seed=1)


def test_csv_trace(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("at_s,rows,jobs\n0,100,1\n10,200,2\n45,50,1\n")
    trace = load_csv(path, step_s=30)
    assert trace.steps == 2 and trace.rows.tolist() == [300, 50] and trace.jobs.tolist() == [3, 1]
    path.write_text("when,rows\n0,1\n")
    with pytest.raises(TraceError, match="at_s,rows"):
        load_csv(path, step_s=30)
    path.write_text("at_s,rows\n0,x\n")
    with pytest.raises(TraceError, match="line 2"):
        load_csv(path, step_s=30)


@pytest.mark.parametrize("kind", ["steady", "diurnal", "bursty"])
def test_synthetic_traces_keep_their_mean(kind):
    trace = synthetic(kind, days=20, step_s=60, seed=3, mean_rows_per_s=200, rows_per_job=100)
    assert trace.rows.sum() / trace.duration_s == pytest.approx(200, rel=0.15)
    assert synthetic(kind, days=1, step_s=60, seed=3, mean_rows_per_s=200).rows.tolist() == \
        synthetic(kind, days=1, step_s=60, seed=3, mean_rows_per_s=200).rows.tolist()


def test_diurnal_peaks_in_the_afternoon():
    trace = synthetic("diurnal", days=1, step_s=3600, seed=1, mean_rows_per_s=1000, rows_per_job=10, poisson=False)
    assert int(np.argmax(trace.rows)) == 14 and int(np.argmin(trace.rows)) == 2


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1.5d", 129600), ("45", 45),
                                           ("250ms", 0.25)])
def test_durations(text, seconds):
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "m"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration_s(text)


def test_cli_simulate_json_and_errors():
    runner = CliRunner()
    res = runner.invoke(app, ["scheduler", "simulate", "--synthetic", "steady", "--days", "0.5", "--max-replicas", "10",
                              "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    names = [p["policy"] for p in doc["policies"]]
    assert names[:2] == ["all on-demand", "all spot"] and len(names) == 4
    assert doc["policies"][0]["cost_vs_all_on_demand"] == 1.0
    bad = runner.invoke(app, ["scheduler", "simulate", "--synthetic", "steady", "--cold-start", "soon"])
    assert bad.exit_code == 2 and "--cold-start" in bad.output
    both = runner.invoke(app, ["scheduler", "simulate", "--synthetic", "steady", "--trace", "x.csv"])
    assert both.exit_code == 2 and "exactly one" in both.output
