"""lag -> replicas as KEDA + HPA compute it, and the work mode; one table row per rule."""

from __future__ import annotations

import pytest

from spotbatch.scaler.policy import (
    Metric,
    ReplicaBounds,
    hpa_replicas,
    keda_replicas,
    lag_metric,
    work_metric,
    work_replicas,
)

B = ReplicaBounds  # min 0, max 100 by default

# (metric, target, current, bounds, expected)
HPA_RULES = [
    ("ceil(total / threshold)", 95, 10, None, B(), 10),
    ("exact multiple", 100, 10, None, B(), 10),
    ("one over a multiple rounds up", 101, 10, None, B(), 11),
    ("zero metric clamps to 1 (the HPA never goes below 1)", 0, 10, None, B(), 1),
    ("clamp to maxReplicaCount", 5000, 10, None, B(max_replicas=7), 7),
    ("clamp to minReplicaCount", 10, 10, None, B(min_replicas=3), 3),
    ("tolerance: within 10% keeps current (105 vs 10 x 10)", 105, 10, 10, B(), 10),
    ("tolerance: 10% below keeps current (90 vs 100)", 90, 10, 10, B(), 10),
    # The HPA compares in float64 as we do: |1 - 1.1| is 0.10000000000000009 > 0.1.
    ("tolerance: 10% above moves, as float64 in the HPA (110 -> 11)", 110, 10, 10, B(), 11),
    ("tolerance: beyond 10% moves (111 -> 12)", 111, 10, 10, B(), 12),
    ("tolerance: scale in beyond 10% (85 -> 9)", 85, 10, 10, B(), 9),
    ("tolerance stops one short of partitions (KEDA #2908): 46 at 5 -> 5", 46, 10, 5, B(), 5),
    ("float target (work mode)", 250.0, 62.5, None, B(), 4),
]


@pytest.mark.parametrize("metric,target,current,bounds,expected", [r[1:] for r in HPA_RULES], ids=[r[0] for r in HPA_RULES])
def test_hpa_rules(metric, target, current, bounds, expected):
    assert hpa_replicas(metric, target, current, bounds) == expected


# (metric, current, bounds, cooldown_elapsed, expected)
KEDA_RULES = [
    ("inactive, min 0, steady state: 0", Metric(0, 10, False), None, B(), True, 0),
    ("inactive, min 0, at 0 stays 0", Metric(0, 10, False), 0, B(), True, 0),
    ("inactive, cooldown passed: to 0", Metric(0, 10, False), 3, B(), True, 0),
    ("inactive, cooldown not passed: HPA (to 1)", Metric(0, 10, False), 3, B(), False, 1),
    ("inactive but min 2: HPA keeps min", Metric(0, 10, False), 3, B(min_replicas=2), True, 2),
    ("inactive, min 2, at 0: KEDA restores min", Metric(0, 10, False), 0, B(min_replicas=2), True, 2),
    ("active from 0: KEDA steps to 1", Metric(500, 10, True), 0, B(), True, 1),
    ("active from 0 with min 3: to 3", Metric(500, 10, True), 0, B(min_replicas=3), True, 3),
    ("active at 1: HPA takes over", Metric(500, 10, True), 1, B(), True, 50),
    ("active steady state: ceil", Metric(45, 10, True), None, B(), True, 5),
    ("active (persistent lag only), metric 0: 1", Metric(0, 10, True), None, B(), True, 1),
]


@pytest.mark.parametrize("metric,current,bounds,cooldown,expected", [r[1:] for r in KEDA_RULES], ids=[r[0] for r in KEDA_RULES])
def test_keda_rules(metric, current, bounds, cooldown, expected):
    assert keda_replicas(metric, current, bounds, cooldown_elapsed=cooldown) == expected


# (pending rows, rows/s per replica, drain s, expected)
WORK_RULES = [
    ("ceil(pending / (rate x drain))", 1000, 10.0, 30.0, 4),
    ("exact", 900, 10.0, 30.0, 3),
    ("nothing pending: 0", 0, 10.0, 30.0, 0),
    ("one row: 1", 1, 10.0, 30.0, 1),
    ("faster replicas: fewer", 1000, 100.0, 30.0, 1),
    ("shorter drain target: more", 1000, 10.0, 5.0, 20),
]


@pytest.mark.parametrize("pending,rate,drain,expected", [r[1:] for r in WORK_RULES], ids=[r[0] for r in WORK_RULES])
def test_work_replicas_rules(pending, rate, drain, expected):
    assert work_replicas(pending, rows_per_s_per_replica=rate, drain_s=drain) == expected


@pytest.mark.parametrize("pending,lag_active,partitions,allow_idle,expected", [
    (1000, True, 8, False, (1000.0, 300.0, True)),
    (10_000, True, 4, False, (1200.0, 300.0, True)),   # capped: 4 partitions x target
    (10_000, True, 4, True, (10_000.0, 300.0, True)),  # allowIdleConsumers: uncapped
    (0, True, 4, False, (0.0, 300.0, True)),           # rows unknown but records unread: stay active
    (0, False, 4, False, (0.0, 300.0, False)),
    (5, False, 4, False, (5.0, 300.0, True)),          # checkpointed rows left: active
], ids=["metric=pending, target=rate x drain", "partition cap", "idle consumers allowed",
        "active by lag alone", "idle", "active by pending rows alone"])
def test_work_metric(pending, lag_active, partitions, allow_idle, expected):
    m = work_metric(pending, rows_per_s_per_replica=10.0, drain_s=30.0, partition_count=partitions,
                    lag_active=lag_active, allow_idle_consumers=allow_idle)
    assert (m.value, m.target, m.active) == expected


def test_work_metric_gives_work_replicas_through_the_hpa():
    m = work_metric(1000, rows_per_s_per_replica=10.0, drain_s=30.0, partition_count=8, lag_active=True)
    assert hpa_replicas(m.value, m.target, None, B()) == work_replicas(1000, rows_per_s_per_replica=10.0, drain_s=30.0)


def test_lag_metric():
    assert lag_metric(42, True, 10) == Metric(42.0, 10.0, True)


@pytest.mark.parametrize("kwargs", [{"min_replicas": -1}, {"min_replicas": 5, "max_replicas": 4}, {"max_replicas": 0}])
def test_bounds_validated(kwargs):
    with pytest.raises(ValueError):
        ReplicaBounds(**kwargs)


def test_bad_rates_rejected():
    with pytest.raises(ValueError):
        work_replicas(10, rows_per_s_per_replica=0, drain_s=10)
    with pytest.raises(ValueError):
        hpa_replicas(10, 0, None, B())
