"""The gates a challenger passes at every rollout step: pure functions over made-up-able stats.

Each gate compares the challenger with the champion (or with a fixed floor) and answers
``pass``, ``fail`` or ``waiting``: a gate with too little data waits (it neither passes
nor fails), so a handful of unlucky jobs cannot roll a good version back, and an idle
step cannot promote a bad one. A boundary value passes (``>=`` a floor, ``<=`` a cap).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Optional

__all__ = ["Thresholds", "VersionStats", "ShadowStats", "GateResult", "evaluate", "verdict"]

_EPS = 1e-9  # sums of floats land a hair off the boundary they should sit on
Status = Literal["pass", "fail", "waiting", "off"]


@dataclass(frozen=True)
class Thresholds:
    """Gate settings, as the rollout was started with (kept in the rollout record)."""

    min_agreement: float = 0.98  # rows-weighted mean agreement with the champion, on shadowed jobs
    min_low_agreement: Optional[float] = None  # its tail (per-job 5th percentiles); None: min_agreement - 0.05
    max_error_rate_increase: float = 0.01  # challenger's failed share minus the champion's
    max_latency_ratio: float = 1.5  # challenger's seconds per row over the champion's
    max_nan_rate: Optional[float] = None  # NaN rows per row, from status records' nan_rows; None: no gate
    min_jobs: int = 10  # finished jobs on each side before the error and latency gates judge
    min_shadow_jobs: int = 5  # shadowed jobs before the agreement gates judge

    def __post_init__(self) -> None:
        if self.min_low_agreement is None:
            object.__setattr__(self, "min_low_agreement", max(0.0, self.min_agreement - 0.05))
        for flag, value in (("min-agreement", self.min_agreement), ("min-low-agreement", self.min_low_agreement),
                            ("max-error-rate-increase", self.max_error_rate_increase)):
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"bad --{flag} {value!r}: give a fraction in [0, 1], e.g. 0.98")
        if not (math.isfinite(self.max_latency_ratio) and self.max_latency_ratio > 0):
            raise ValueError(f"bad --max-latency-ratio {self.max_latency_ratio!r}: give a ratio > 0, e.g. 1.5")
        if self.max_nan_rate is not None and not 0.0 <= self.max_nan_rate <= 1.0:
            raise ValueError(f"bad --max-nan-rate {self.max_nan_rate!r}: give a fraction in [0, 1], e.g. 0")
        if self.min_jobs < 1 or self.min_shadow_jobs < 1:
            raise ValueError("min_jobs and min_shadow_jobs must be >= 1")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Thresholds":
        return cls(**data)

    def with_min_jobs(self, bake_jobs: int) -> "Thresholds":
        """A step that bakes on fewer jobs than ``min_jobs`` judges on what it baked."""
        return replace(self, min_jobs=max(1, min(self.min_jobs, bake_jobs)))


@dataclass
class VersionStats:
    """Finished jobs of one version (one route) in a window, from status records."""

    jobs_ok: int = 0
    jobs_failed: int = 0
    rows: int = 0  # rows of ok jobs
    seconds: float = 0.0  # inference seconds of ok jobs that reported them ...
    timed_rows: int = 0  # ... and those jobs' rows: latency is seconds per row
    nan_rows: int = 0
    nan_reported: bool = False  # some status record carried nan_rows

    @property
    def jobs(self) -> int:
        return self.jobs_ok + self.jobs_failed

    @property
    def error_rate(self) -> float:
        return self.jobs_failed / self.jobs if self.jobs else 0.0

    def add(self, *, ok: bool, rows: int = 0, seconds: float | None = None, nan_rows: int | None = None) -> None:
        if not ok:
            self.jobs_failed += 1
            return
        self.jobs_ok += 1
        self.rows += rows
        if seconds is not None and rows > 0:
            self.seconds += seconds
            self.timed_rows += rows
        if nan_rows is not None:
            self.nan_rows += nan_rows
            self.nan_reported = True


@dataclass
class ShadowStats:
    """Agreement of the challenger with the champion on shadowed champion jobs.

    ``low`` is the rows-weighted mean of the jobs' own 5th percentiles: the exact
    percentile over all rows would need every row, and the records carry three numbers."""

    jobs: int = 0
    rows: int = 0
    weighted_mean: float = 0.0  # sum of mean * rows
    weighted_low: float = 0.0  # sum of low * rows
    worst: float = 1.0  # the lowest per-row agreement seen

    def add(self, *, rows: int, mean: float, low: float, lowest: float) -> None:
        # A NaN or inf agreement is the challenger emitting garbage: count it as none.
        mean, low, lowest = (v if math.isfinite(v) else 0.0 for v in (mean, low, lowest))
        weight = max(rows, 1)
        self.jobs += 1
        self.rows += weight
        self.weighted_mean += mean * weight
        self.weighted_low += low * weight
        self.worst = min(self.worst, lowest)

    @property
    def mean(self) -> float:
        return self.weighted_mean / self.rows if self.rows else 0.0

    @property
    def low(self) -> float:
        return self.weighted_low / self.rows if self.rows else 0.0


@dataclass(frozen=True)
class GateResult:
    name: str
    status: Status
    value: Optional[float]
    threshold: Optional[float]
    why: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> Optional[bool]:
        """True (passed, or off), False (failed), None (waiting for data)."""
        return None if self.status == "waiting" else self.status != "fail"

    def to_json(self) -> dict[str, Any]:
        value = None if self.value is None else round(self.value, 6)
        return {"name": self.name, "status": self.status, "ok": self.ok, "value": value,
                "threshold": self.threshold, "why": self.why, **self.extra}


def _floor(name: str, value: float, threshold: float, what: str) -> GateResult:
    ok = value >= threshold - _EPS
    return GateResult(name, "pass" if ok else "fail", value, threshold,
                      f"{what} {value:.4f} {'>=' if ok else '<'} {threshold}")


def _cap(name: str, value: float, threshold: float, what: str) -> GateResult:
    ok = value <= threshold + _EPS
    return GateResult(name, "pass" if ok else "fail", value, threshold,
                      f"{what} {value:.4f} {'<=' if ok else '>'} {threshold}")


def _waiting(name: str, threshold: float | None, why: str) -> GateResult:
    return GateResult(name, "waiting", None, threshold, why)


def _agreement(shadow: ShadowStats, shadowing: bool, t: Thresholds) -> list[GateResult]:
    low_floor = float(t.min_low_agreement or 0.0)
    if not shadowing:
        why = "shadow is 0: no agreement data (start with --shadow 0.2 to judge outputs)"
        return [GateResult("agreement", "off", None, t.min_agreement, why),
                GateResult("low_agreement", "off", None, low_floor, why)]
    if shadow.jobs < t.min_shadow_jobs:
        why = f"{shadow.jobs}/{t.min_shadow_jobs} shadowed jobs"
        return [_waiting("agreement", t.min_agreement, why), _waiting("low_agreement", low_floor, why)]
    return [_floor("agreement", shadow.mean, t.min_agreement, "mean agreement"),
            _floor("low_agreement", shadow.low, low_floor, "5th-percentile agreement")]


def _enough(challenger: VersionStats, champion: VersionStats, t: Thresholds, jobs_of=lambda s: s.jobs) -> str:
    """Why the two sides are too small to compare ('' when they are not)."""
    short = [f"{side} {jobs_of(s)}/{t.min_jobs} jobs" for side, s in (("challenger", challenger),
                                                                        ("champion", champion))
             if jobs_of(s) < t.min_jobs]
    return ", ".join(short)


def _error_rate(challenger: VersionStats, champion: VersionStats, t: Thresholds) -> GateResult:
    if short := _enough(challenger, champion, t):
        return _waiting("error_rate", t.max_error_rate_increase, short)
    result = _cap("error_rate", challenger.error_rate - champion.error_rate, t.max_error_rate_increase,
                  "error-rate increase")
    return replace(result, extra={"challenger": round(challenger.error_rate, 6), "champion": round(champion.error_rate, 6)})


def _latency(challenger: VersionStats, champion: VersionStats, t: Thresholds) -> GateResult:
    timed = lambda s: s.jobs_ok if s.timed_rows else 0  # noqa: E731 - jobs that reported seconds
    if short := _enough(challenger, champion, t, timed):
        return _waiting("latency", t.max_latency_ratio, short)
    ours, theirs = challenger.seconds / challenger.timed_rows, champion.seconds / champion.timed_rows
    if theirs <= 0:
        return GateResult("latency", "pass", 1.0, t.max_latency_ratio, "champion reports 0 s per row")
    result = _cap("latency", ours / theirs, t.max_latency_ratio, "seconds-per-row ratio")
    return replace(result, extra={"challenger_s_per_row": ours, "champion_s_per_row": theirs})


def _nan_rate(challenger: VersionStats, t: Thresholds) -> list[GateResult]:
    if t.max_nan_rate is None:
        return []
    if not challenger.nan_reported:
        return [_waiting("nan_rate", t.max_nan_rate, "no status record reports nan_rows yet")]
    if challenger.rows == 0:
        return [_waiting("nan_rate", t.max_nan_rate, "challenger wrote no rows yet")]
    return [_cap("nan_rate", challenger.nan_rows / challenger.rows, t.max_nan_rate, "NaN rows per row")]


def evaluate(challenger: VersionStats, champion: VersionStats, shadow: ShadowStats, thresholds: Thresholds, *,
             shadowing: bool = True) -> list[GateResult]:
    """Every gate, in a fixed order: agreement, low_agreement, error_rate, latency[, nan_rate].

    ``challenger``: its jobs in the current step; ``champion``: its jobs since the rollout
    started (at the 100% step it gets none, so a per-step baseline would never fill);
    ``shadow``: every shadowed job since the rollout started; ``shadowing``: whether the
    rollout shadows at all (if not, the agreement gates are off, not waiting).
    """
    return [*_agreement(shadow, shadowing, thresholds), _error_rate(challenger, champion, thresholds),
            _latency(challenger, champion, thresholds), *_nan_rate(challenger, thresholds)]


def verdict(results: list[GateResult]) -> Status:
    """``fail`` if any gate fails, else ``waiting`` if any waits, else ``pass``."""
    statuses = {r.status for r in results}
    return "fail" if "fail" in statuses else "waiting" if "waiting" in statuses else "pass"
