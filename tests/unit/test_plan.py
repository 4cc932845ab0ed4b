"""Plan (scheduler/plan.py): the cheapest setting that meets the SLO, and it still meets
it on a seed the search never saw."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from spotbatch.cli import app
from spotbatch.scheduler.plan import PLAN_KIND, PlanError, default_grid, plan_json, search, setting_from_plan
from spotbatch.scheduler.prices import InstancePrice
from spotbatch.scheduler.simulate import Policy, SimConfig, SpotMarket, simulate
from spotbatch.scheduler.traces import synthetic

PRICE = InstancePrice("g5.xlarge", on_demand_per_h=1.0, spot_per_h=0.35, gpus=1, region="us-east-1")
SIM = SimConfig(rows_per_s=100, cold_start_s=120, lag_threshold=30, max_replicas=12, step_s=60)
# A harsh market: spot is reclaimed whole about twice a day and stays gone for ~3 h.
MARKET = SpotMarket(interruption_rate_per_h=0.01, events_per_day=2.0, event_kill_fraction=1.0, shortage_mean_s=3 * 3600)
TRACE = synthetic("diurnal", days=1.5, step_s=60, seed=7, mean_rows_per_s=400, rows_per_job=1000)


@pytest.fixture(scope="module")
def planned():
    return search(TRACE, sim=SIM, market=MARKET, price=PRICE, seeds=[1, 2], slo_drain_s=1800, max_miss_fraction=0.001,
                  baselines=[0, 1, 2, 4], fallback_caps=[0, 4, 12])


def test_recommends_the_cheapest_setting_that_meets_the_slo(planned):
    best = planned.recommended
    assert best is not None and best.meets
    meeting = [e for e in planned.ranked if e.meets]
    assert best.cost == min(e.cost for e in meeting)
    assert any(not e.meets for e in planned.ranked)  # the harsh market rules some settings out
    assert best.cost < planned.reference.cost  # and it is cheaper than all on-demand
    assert best.pools.fallback_cap > 0  # with spot vanishing for hours, only fallback keeps the SLO cheaply


def test_recommendation_meets_the_slo_on_a_new_seed(planned):
    best = planned.recommended
    sim = replace(SIM, slo_drain_s=planned.slo_drain_s)
    again = simulate(TRACE, Policy("recommended", best.pools), sim=sim, market=MARKET, price=PRICE, seed=1234)
    assert again.miss_fraction <= planned.max_miss_fraction


def test_plan_json_is_applys_input(planned):
    doc = json.loads(json.dumps(plan_json(planned, runners_up=3)))
    assert doc["kind"] == PLAN_KIND and len(doc["runners_up"]) == 3
    pools, total, lag = setting_from_plan(doc)
    assert pools == planned.recommended.pools and (total, lag) == (SIM.max_replicas, SIM.lag_threshold)
    assert doc["recommended"]["cost_vs_all_on_demand"] < 1


@pytest.mark.parametrize("doc, match", [
    ({"kind": "other"}, "not a plan"),
    ({"kind": PLAN_KIND, "recommended": None}, "recommends nothing"),
    ({"kind": PLAN_KIND, "recommended": {"baseline": -1, "max_replicas": 3}}, "bad recommended"),
])
def test_bad_plan_files(doc, match):
    with pytest.raises(PlanError, match=match):
        setting_from_plan(doc)


def test_default_grid():
    baselines, caps = default_grid(40)
    assert baselines == [0, 1, 2, 4, 8, 16] and caps == [0, 5, 10, 20, 40]


def test_impossible_slo_recommends_nothing():
    tiny = replace(SIM, max_replicas=2)
    plan = search(TRACE, sim=tiny, market=MARKET, price=PRICE, seeds=[1], slo_drain_s=600, baselines=[0, 1],
                  fallback_caps=[0])
    assert plan.recommended is None and plan_json(plan)["recommended"] is None


def test_cli_plan_json_feeds_apply_parsing(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["scheduler", "plan", "--synthetic", "steady", "--days", "0.5", "--max-replicas", "8",
                              "--slo-drain", "30m", "--step", "60s", "--baselines", "0,2", "--fallback-caps", "0,4",
                              "--seeds", "1", "--jobs", "1", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    pools, total, lag = setting_from_plan(doc)
    assert (total, lag) == (8, 30) and pools.baseline in (0, 2) and pools.fallback_cap in (0, 4)
    bad = runner.invoke(app, ["scheduler", "plan", "--synthetic", "steady", "--slo-drain", "soon"])
    assert bad.exit_code == 2 and "--slo-drain" in bad.output
    bad = runner.invoke(app, ["scheduler", "plan", "--synthetic", "steady", "--slo-drain", "30m", "--seeds", "a,b"])
    assert bad.exit_code == 2 and "--seeds" in bad.output
