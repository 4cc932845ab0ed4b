"""KEDA's kafka-trigger lag rules (ref/FACTS.md), one table row per rule."""

from __future__ import annotations

import pytest

from spotbatch.scaler.lag import NO_COMMIT, LagError, LagOptions, compute_lag, partition_lag

T = "jobs"


def _tp(*pairs):
    return {(T, p): v for p, v in pairs}


# (committed, log_end, options, previous, (metric lag, activation lag))
PARTITION_RULES = [
    ("committed present: log end - committed", 40, 100, {}, None, (60, 60)),
    ("committed at the end: 0", 100, 100, {}, None, (0, 0)),
    ("policy earliest, committed present: same rule", 40, 100, {"offset_reset_policy": "earliest"}, None, (60, 60)),
    ("no commit, latest: 1", NO_COMMIT, 100, {}, None, (1, 1)),
    ("no commit, latest, scaleToZeroOnInvalidOffset: 0", NO_COMMIT, 100,
     {"scale_to_zero_on_invalid_offset": True}, None, (0, 0)),
    ("no commit, earliest: whole log", NO_COMMIT, 100, {"offset_reset_policy": "earliest"}, None, (100, 100)),
    ("no commit, earliest, scaleToZeroOnInvalidOffset: 0", NO_COMMIT, 100,
     {"offset_reset_policy": "earliest", "scale_to_zero_on_invalid_offset": True}, None, (0, 0)),
    ("no commit, latest, empty log: still 1", NO_COMMIT, 0, {}, None, (1, 1)),
    ("excludePersistentLag, first poll: counts", 40, 100, {"exclude_persistent_lag": True}, None, (60, 60)),
    ("excludePersistentLag, offset unchanged: 0 for metric, counts for activation", 40, 100,
     {"exclude_persistent_lag": True}, 40, (0, 60)),
    ("excludePersistentLag, offset moved: counts", 50, 100, {"exclude_persistent_lag": True}, 40, (50, 50)),
    ("persistent lag ignored without excludePersistentLag", 40, 100, {}, 40, (60, 60)),
]


@pytest.mark.parametrize("committed,log_end,opts,previous,expected",
                         [r[1:] for r in PARTITION_RULES], ids=[r[0] for r in PARTITION_RULES])
def test_partition_lag_rules(committed, log_end, opts, previous, expected):
    assert partition_lag(committed, log_end, LagOptions(**opts), previous) == expected


# (committed, log_ends, options, (total_lag, total_with_persistent, active))
TOTAL_RULES = [
    ("sum over partitions", _tp((0, 5), (1, 7)), _tp((0, 10), (1, 20)), {}, (18, 18, True)),
    ("partition missing from log ends counts 0", _tp((0, 5), (1, 7)), _tp((0, 10)), {}, (5, 5, True)),
    ("partition missing from committed: no commit (latest -> 1)", _tp((0, 10)), _tp((0, 10), (1, 50)), {}, (1, 1, True)),
    ("cap: total/threshold above partitions -> partitions x threshold", _tp((0, 0), (1, 0)),
     _tp((0, 500), (1, 500)), {}, (20, 1000, True)),
    ("cap uses integer division: 2 partitions, 29 lag, threshold 10 -> no cap", _tp((0, 0), (1, 0)),
     _tp((0, 29), (1, 0)), {}, (29, 29, True)),
    ("cap boundary: 30 // 10 = 3 > 2 -> 20", _tp((0, 0), (1, 0)), _tp((0, 30), (1, 0)), {}, (20, 30, True)),
    ("allowIdleConsumers: no cap", _tp((0, 0), (1, 0)), _tp((0, 500), (1, 500)),
     {"allow_idle_consumers": True}, (1000, 1000, True)),
    ("limitToPartitionsWithLag: cap at partitions with lag", _tp((0, 0), (1, 0), (2, 0), (3, 0)),
     _tp((0, 500), (1, 0), (2, 0), (3, 0)), {"limit_to_partitions_with_lag": True}, (10, 500, True)),
    ("ensureEvenDistribution: round up to a factor of 6 (25 -> 3 x 10)", _tp(*[(p, 0) for p in range(6)]),
     _tp((0, 25), *[(p, 0) for p in range(1, 6)]), {"ensure_even_distribution_of_partitions": True}, (30, 25, True)),
    ("ensureEvenDistribution: 41 -> 6 x 10 (no factor 5 of 6)", _tp(*[(p, 0) for p in range(6)]),
     _tp((0, 41), *[(p, 0) for p in range(1, 6)]), {"ensure_even_distribution_of_partitions": True}, (60, 41, True)),
    ("ensureEvenDistribution: zero lag -> smallest factor 1", _tp((0, 9), (1, 9)), _tp((0, 9), (1, 9)),
     {"ensure_even_distribution_of_partitions": True}, (10, 0, False)),
    ("activation: strictly greater than activationLagThreshold (equal -> inactive)", _tp((0, 0)), _tp((0, 5)),
     {"activation_lag_threshold": 5}, (5, 5, False)),
    ("activation: one above -> active", _tp((0, 0)), _tp((0, 6)), {"activation_lag_threshold": 5}, (6, 6, True)),
    ("no lag: inactive", _tp((0, 10)), _tp((0, 10)), {}, (0, 0, False)),
    ("scaleToZeroOnInvalidOffset: a new group is inactive", {}, _tp((0, 10), (1, 10)),
     {"scale_to_zero_on_invalid_offset": True}, (0, 0, False)),
    ("new group, latest: 1 per partition", {}, _tp((0, 10), (1, 10)), {}, (2, 2, True)),
    ("new group, earliest: whole log", {}, _tp((0, 10), (1, 10)), {"offset_reset_policy": "earliest"}, (20, 20, True)),
]


@pytest.mark.parametrize("committed,ends,opts,expected", [r[1:] for r in TOTAL_RULES], ids=[r[0] for r in TOTAL_RULES])
def test_total_lag_rules(committed, ends, opts, expected):
    result = compute_lag(committed, ends, LagOptions(**opts))
    assert (result.total_lag, result.total_lag_with_persistent, result.active) == expected


def test_persistent_lag_over_two_polls():
    opts = LagOptions(exclude_persistent_lag=True, lag_threshold=100)  # no partition cap here
    ends = _tp((0, 100), (1, 100))
    first = compute_lag(_tp((0, 40), (1, 90)), ends, opts)
    assert first.total_lag == 70
    second = compute_lag(_tp((0, 40), (1, 95)), ends, opts, first.previous)
    # partition 0 stuck at 40: excluded from the metric, still counted for activation
    assert (second.total_lag, second.total_lag_with_persistent, second.active) == (5, 65, True)
    assert second.previous == _tp((0, 40), (1, 95))


def test_persistent_lag_alone_keeps_trigger_active():
    opts = LagOptions(exclude_persistent_lag=True)
    ends = _tp((0, 100))
    second = compute_lag(_tp((0, 99)), ends, opts, previous=_tp((0, 99)))
    assert (second.total_lag, second.active) == (0, True)


def test_without_topic_every_topic_counts():
    committed = {("a", 0): 1, ("b", 0): 2}
    ends = {("a", 0): 11, ("b", 0): 12}
    result = compute_lag(committed, ends, LagOptions(allow_idle_consumers=True))
    assert result.total_lag == 20 and result.partition_count == 2
    assert [p.topic for p in result.partitions] == ["a", "b"]


def test_to_dict_lists_partitions():
    data = compute_lag(_tp((0, 3)), _tp((0, 10)), LagOptions()).to_dict()
    assert data["total_lag"] == 7
    assert data["partitions"] == [{"topic": T, "partition": 0, "committed": 3, "log_end": 10,
                                   "lag": 7, "lag_with_persistent": 7}]


@pytest.mark.parametrize("opts,needle", [
    ({"lag_threshold": 0}, "lagThreshold must be > 0"),
    ({"activation_lag_threshold": -1}, "activationLagThreshold must be >= 0"),
    ({"offset_reset_policy": "oldest"}, "offsetResetPolicy"),
    ({"allow_idle_consumers": True, "limit_to_partitions_with_lag": True}, "cannot both be true"),
    ({"allow_idle_consumers": True, "ensure_even_distribution_of_partitions": True}, "cannot both be true"),
])
def test_invalid_options(opts, needle):
    with pytest.raises(LagError, match=needle):
        LagOptions(**opts)
