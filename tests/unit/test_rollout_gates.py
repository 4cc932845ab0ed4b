"""Rollout gates, the stats they read and the choice of jobs to repair, on made-up numbers (no broker)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from spotbatch.rollouts.controller import check_steps
from spotbatch.rollouts.gates import ShadowStats, Thresholds, VersionStats, evaluate, verdict
from spotbatch.rollouts.observe import outcomes, shadows, window
from spotbatch.rollouts.records import Rollout, ShadowRecord
from spotbatch.rollouts.registry import RegistryError
from spotbatch.rollouts.repair import _ranges, jobs_to_repair


def _stats(ok: int, failed: int = 0, *, rows_per_job: int = 10, s_per_row: float = 0.01) -> VersionStats:
    stats = VersionStats()
    for _ in range(ok):
        stats.add(ok=True, rows=rows_per_job, seconds=rows_per_job * s_per_row)
    for _ in range(failed):
        stats.add(ok=False)
    return stats


def _shadow(jobs: int, mean: float, low: float | None = None) -> ShadowStats:
    stats = ShadowStats()
    for _ in range(jobs):
        stats.add(rows=10, mean=mean, low=mean if low is None else low, lowest=mean)
    return stats


def _by_name(results) -> dict:
    return {r.name: r for r in results}


def test_a_good_challenger_passes_every_gate():
    results = evaluate(_stats(20), _stats(100), _shadow(10, 0.995), Thresholds())
    assert [r.name for r in results] == ["agreement", "low_agreement", "error_rate", "latency"]
    assert verdict(results) == "pass" and all(r.ok for r in results)


def test_boundaries_pass_and_just_past_them_fails():
    t = Thresholds(min_agreement=0.98, max_error_rate_increase=0.1, max_latency_ratio=1.5)
    assert t.min_low_agreement == pytest.approx(0.93)
    at = _by_name(evaluate(_stats(18, 2, s_per_row=0.015), _stats(10, s_per_row=0.01), _shadow(5, 0.98), t))
    assert at["agreement"].status == "pass"  # exactly 0.98
    assert at["error_rate"].status == "pass"  # 0.1 - 0.0 == 0.1
    assert at["latency"].status == "pass"  # 1.5x exactly
    assert verdict(list(at.values())) == "pass"
    past = _by_name(evaluate(_stats(16, 4, s_per_row=0.0151), _stats(10), _shadow(5, 0.9799), t))
    assert {n: r.status for n, r in past.items()} == {"agreement": "fail", "low_agreement": "pass",
                                                      "error_rate": "fail", "latency": "fail"}
    assert "0.9799 < 0.98" in past["agreement"].why
    assert past["error_rate"].to_json()["challenger"] == 0.2


def test_the_tail_gate_catches_what_the_mean_hides():
    results = _by_name(evaluate(_stats(20), _stats(20), _shadow(10, 0.99, low=0.90), Thresholds()))
    assert results["agreement"].status == "pass" and results["low_agreement"].status == "fail"
    assert verdict(list(results.values())) == "fail"


def test_too_little_data_waits_and_never_fails():
    t = Thresholds(min_jobs=10, min_shadow_jobs=5)
    results = _by_name(evaluate(_stats(3, 3), _stats(100), _shadow(4, 0.1), t))
    assert {r.status for r in results.values()} == {"waiting"}
    assert all(r.ok is None for r in results.values())
    assert results["error_rate"].why == "challenger 6/10 jobs"
    assert results["agreement"].why == "4/5 shadowed jobs"
    assert verdict(list(results.values())) == "waiting"
    # the champion's side counts too; and a fail anywhere beats a wait elsewhere
    assert _by_name(evaluate(_stats(20), _stats(2), _shadow(5, 1.0), t))["latency"].why == "champion 2/10 jobs"
    assert verdict(evaluate(_stats(20, 5), _stats(20), _shadow(0, 1.0), t)) == "fail"


def test_no_shadow_turns_the_agreement_gates_off():
    results = evaluate(_stats(20), _stats(20), ShadowStats(), Thresholds(), shadowing=False)
    assert [(r.name, r.status, r.ok) for r in results[:2]] == [("agreement", "off", True), ("low_agreement", "off", True)]
    assert verdict(results) == "pass"


def test_nan_agreement_counts_as_none_and_the_nan_gate_needs_reports():
    shadow = ShadowStats()
    for mean in (1.0, float("nan")):
        shadow.add(rows=10, mean=mean, low=mean, lowest=mean)
    assert shadow.mean == 0.5 and shadow.worst == 0.0
    t = Thresholds(max_nan_rate=0.0, min_jobs=1)
    unreported = _by_name(evaluate(_stats(5), _stats(5), _shadow(5, 1.0), t))["nan_rate"]
    assert unreported.status == "waiting" and "nan_rows" in unreported.why
    reported = _stats(5)
    reported.add(ok=True, rows=10, seconds=0.1, nan_rows=1)
    assert _by_name(evaluate(reported, _stats(5), _shadow(5, 1.0), t))["nan_rate"].status == "fail"


def test_thresholds_refuse_nonsense_with_the_flag_to_fix():
    with pytest.raises(ValueError, match="--min-agreement"):
        Thresholds(min_agreement=1.5)
    with pytest.raises(ValueError, match="--max-latency-ratio"):
        Thresholds(max_latency_ratio=0)
    assert Thresholds.from_json(Thresholds(min_jobs=3).to_json()) == Thresholds(min_jobs=3)
    assert Thresholds(min_jobs=10).with_min_jobs(4).min_jobs == 4


def test_steps_must_ascend_to_one():
    assert check_steps([0.1, 0.5, 1]) == (0.1, 0.5, 1.0)
    for bad, words in (([0.5, 0.1, 1.0], "ascend"), ([0.1, 0.5], "end below 1.0"), ([0, 1.0], "in (0, 1]"),
                       ([], "no steps")):
        with pytest.raises(RegistryError, match=words.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
            check_steps(bad)


# ---- observe: which records count, for which window -----------------------------------

def _status(at_ms: int, version: int, route: str, *, ok: bool = True, model: str = "embedder", job: str = "j",
            rows: int = 10, seconds: float = 0.1, offset: int = 0, **extra) -> SimpleNamespace:
    body = {"v": 1, "job_id": job, "status": "ok" if ok else "failed", "worker": "w", "at": at_ms / 1000,
            "rows": rows, "seconds": seconds, "model": model, "model_version": version, "route": route,
            "source": {"topic": "jobs", "partition": 0, "offset": offset}, **extra}
    return SimpleNamespace(value=json.dumps(body).encode(), timestamp=at_ms)


def test_the_window_counts_only_this_rollouts_pair_and_step():
    rollout = Rollout(name="embedder", champion=1, challenger=2, steps=(0.1, 1.0), step=1, shadow=0.2,
                      started_at=10.0, step_started_at=20.0)
    records = [
        _status(15_000, 2, "challenger"),  # an earlier step: not this step's
        _status(21_000, 2, "challenger"), _status(22_000, 2, "challenger", ok=False),
        _status(11_000, 1, "champion"), _status(9_000, 1, "champion"),  # before the rollout: not counted
        _status(21_000, 2, "pinned"), _status(21_000, 3, "challenger"), _status(21_000, 2, "challenger", model="other"),
        _status(21_000, 2, "challenger", already_done=True),
        SimpleNamespace(value=b"not json", timestamp=21_000),
    ]
    shadow = [SimpleNamespace(value=ShadowRecord("j", "embedder", 1, 2, 10, 0.97, 0.9, 0.8).to_json(), timestamp=12_000),
              SimpleNamespace(value=ShadowRecord("k", "embedder", 1, 3, 10, 0.5, 0.5, 0.5).to_json(), timestamp=12_000),
              SimpleNamespace(value=b"{}", timestamp=12_000)]
    stats = window(rollout, outcomes(records, "embedder"), shadows(shadow, "embedder"))
    assert (stats.challenger.jobs_ok, stats.challenger.jobs_failed) == (1, 1)
    assert stats.champion.jobs == 1
    assert (stats.shadow.jobs, stats.shadow.mean, stats.shadow.low) == (1, 0.97, 0.9)


def test_repair_takes_each_job_once_and_only_if_the_bad_version_wrote_it_last():
    records = [
        _status(1, 2, "challenger", job="a", rows=3, offset=5), _status(2, 2, "challenger", job="a", rows=3, offset=5),
        _status(1, 2, "challenger", job="b", offset=6), _status(3, 1, "champion", job="b", offset=6),  # rewritten
        _status(1, 2, "pinned", job="c", offset=7),  # asked for v2 by number
        _status(1, 2, "challenger", job="d", ok=False, offset=8),  # failed: the DLQ has it
        _status(1, 1, "champion", job="e", offset=9),
    ]
    todo = jobs_to_repair(outcomes(records, "embedder"), 2)
    assert sorted(todo) == ["a"] and todo["a"].rows == 3
    assert _ranges([1, 2, 3, 200, 201, 500]) == [(1, 4), (200, 202), (500, 501)]
