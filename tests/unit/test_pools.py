"""The pool policy (scheduler/pools.py): every transition, table-driven."""

from __future__ import annotations

import pytest

from spotbatch.scheduler.pools import (
    FallbackMemory,
    PoolConfig,
    PoolObservation,
    base_split,
    config_from_metadata,
    config_to_metadata,
    decide,
)

CFG = PoolConfig(baseline=2, spot_max=10, fallback_cap=4, unready_grace_s=300, interruption_rate_max_per_h=0.1,
                 recover_s=600)


def obs(requested: int, ready: int, rate: float = 0.0) -> PoolObservation:
    return PoolObservation(spot_requested=requested, spot_ready=ready, interruption_rate_per_h=rate)


@pytest.mark.parametrize("desired, config, expected", [
    (0, PoolConfig(baseline=2, spot_max=10), (2, 0)),  # baseline always on, even idle
    (1, PoolConfig(baseline=2, spot_max=10), (2, 0)),
    (2, PoolConfig(baseline=2, spot_max=10), (2, 0)),
    (7, PoolConfig(baseline=2, spot_max=10), (2, 5)),  # the rest on spot
    (30, PoolConfig(baseline=2, spot_max=10), (2, 10)),  # spot capped at its max
    (10, PoolConfig(baseline=0, on_demand_above_base_pct=100, spot_max=0), (10, 0)),  # all on-demand
    (10, PoolConfig(baseline=0, spot_max=50), (0, 10)),  # all spot
    (12, PoolConfig(baseline=2, on_demand_above_base_pct=25, spot_max=50), (5, 7)),  # AWS % above base, rounded up
])
def test_base_split(desired, config, expected):
    assert base_split(desired, config) == expected
    split, memory = decide(desired, obs(expected[1], expected[1]), 0.0, config)
    assert (split.on_demand, split.spot, split.fallback) == (*expected, 0)
    assert not memory.active


# Each row: (memory before, desired, observation, now_s) -> (on_demand, spot, fallback, active after)
TRANSITIONS = [
    pytest.param(FallbackMemory(), 8, obs(6, 6), 0, (2, 6, 0, False), id="healthy"),
    pytest.param(FallbackMemory(), 8, obs(6, 3), 100, (2, 6, 0, False), id="short-starts-clock"),
    pytest.param(FallbackMemory(unready_since_s=100), 8, obs(6, 3), 399, (2, 6, 0, False), id="short-within-grace"),
    pytest.param(FallbackMemory(unready_since_s=100), 8, obs(6, 3), 400, (5, 6, 3, True), id="short-past-grace-falls-back"),
    pytest.param(FallbackMemory(unready_since_s=100), 8, obs(6, 0), 400, (6, 6, 4, True), id="gap-above-cap-is-capped"),
    pytest.param(FallbackMemory(unready_since_s=100), 8, obs(6, 6), 400, (2, 6, 0, False), id="ready-again-before-grace"),
    pytest.param(FallbackMemory(), 8, obs(6, 6, rate=0.5), 0, (6, 6, 4, True), id="storm-falls-back-at-once"),
    pytest.param(FallbackMemory(), 8, obs(6, 6, rate=0.1), 0, (2, 6, 0, False), id="rate-at-limit-is-fine"),
    pytest.param(FallbackMemory(unready_since_s=0, fallback=2, active=True), 8, obs(6, 1), 500, (6, 6, 4, True),
                 id="active-ratchets-up-to-gap"),
    pytest.param(FallbackMemory(unready_since_s=0, fallback=3, active=True), 8, obs(6, 5), 500, (5, 6, 3, True),
                 id="active-never-shrinks-while-short"),
    pytest.param(FallbackMemory(unready_since_s=0, fallback=3, active=True), 4, obs(6, 5), 500, (4, 2, 2, True),
                 id="active-shrinks-with-spot-target"),
    pytest.param(FallbackMemory(unready_since_s=0, fallback=3, active=True), 8, obs(6, 6), 500, (5, 6, 3, True),
                 id="recovered-starts-hold"),
    pytest.param(FallbackMemory(fallback=3, active=True, healthy_since_s=500), 8, obs(6, 6), 1099, (5, 6, 3, True),
                 id="recovering-holds-within-recover-s"),
    pytest.param(FallbackMemory(fallback=3, active=True, healthy_since_s=500), 8, obs(6, 6), 1100, (2, 6, 0, False),
                 id="recovered-hands-back"),
    pytest.param(FallbackMemory(fallback=3, active=True, healthy_since_s=500), 8, obs(6, 5), 1050, (5, 6, 3, True),
                 id="short-again-resets-hold"),
    pytest.param(FallbackMemory(fallback=3, active=True, healthy_since_s=500), 8, obs(6, 6, rate=0.2), 1100,
                 (6, 6, 4, True), id="storm-while-recovering-covers-all-spot"),
]


@pytest.mark.parametrize("memory, desired, observed, now_s, expected", TRANSITIONS)
def test_transitions(memory, desired, observed, now_s, expected):
    split, after = decide(desired, observed, now_s, CFG, memory)
    assert (split.on_demand, split.spot, split.fallback, after.active) == expected
    assert split.fallback == after.fallback
    assert split.on_demand == CFG.baseline + split.fallback


def test_short_again_resets_the_recovery_clock():
    memory = FallbackMemory(fallback=3, active=True, healthy_since_s=500)
    _, memory = decide(8, obs(6, 5), 1050, CFG, memory)
    assert memory.healthy_since_s is None
    _, memory = decide(8, obs(6, 6), 1060, CFG, memory)
    split, memory = decide(8, obs(6, 6), 1100, CFG, memory)  # 600 s after the first recovery: not enough
    assert split.fallback == 3 and memory.active
    split, memory = decide(8, obs(6, 6), 1660, CFG, memory)
    assert split.fallback == 0 and not memory.active


def test_cap_zero_never_falls_back():
    config = PoolConfig(baseline=1, spot_max=10, fallback_cap=0)
    split, memory = decide(8, obs(7, 0, rate=5.0), 10_000, config, FallbackMemory(unready_since_s=0))
    assert (split.on_demand, split.spot, split.fallback) == (1, 7, 0)
    assert memory.unready_since_s == 0 and not memory.active


def test_no_flapping_under_a_noisy_spot_pool():
    """Spot readiness bouncing 5 <-> 6 every poll: fallback switches on once, stays."""
    memory, changes, last = FallbackMemory(), 0, None
    for step in range(200):
        ready = 5 if step % 2 else 6
        split, memory = decide(8, obs(6, ready), step * 30.0, CFG, memory)
        if split.fallback != last:
            changes, last = changes + 1, split.fallback
    assert changes <= 2  # 0 at first, then (once short past the grace) it holds


@pytest.mark.parametrize("bad", [dict(baseline=-1), dict(fallback_cap=-2), dict(on_demand_above_base_pct=101),
                                 dict(recover_s=-1)])
def test_bad_config(bad):
    with pytest.raises(ValueError):
        PoolConfig(**bad)


def test_metadata_round_trip():
    config = PoolConfig(baseline=3, spot_max=40, fallback_cap=12, unready_grace_s=240, interruption_rate_max_per_h=0.25,
                        recover_s=900, on_demand_above_base_pct=10)
    meta = config_to_metadata(config)
    assert meta["baseline"] == "3" and meta["fallbackCap"] == "12" and meta["interruptionRateMaxPerHour"] == "0.25"
    assert config_from_metadata({**meta, "pool": "spot", "lagThreshold": "10"}) == config
    assert config_from_metadata({}) == PoolConfig()
    with pytest.raises(ValueError, match="fallbackCap"):
        config_from_metadata({"fallbackCap": "lots"})


def test_max_replicas_per_pool():
    assert PoolConfig(baseline=2, spot_max=30, fallback_cap=8).max_replicas(40) == {"on-demand": 10, "spot": 30}
    assert PoolConfig(baseline=0, on_demand_above_base_pct=100, spot_max=0).max_replicas(40) == {"on-demand": 40, "spot": 0}
