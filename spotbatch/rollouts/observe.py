"""What the workers reported about a rollout: status and shadow records, read from Kafka
and folded into the gates' stats.

Reading is the only I/O here (:func:`read_since`); parsing and folding are pure, so the
unit tests feed them made-up records. Records of other models, malformed records and
``already_done`` statuses (a redelivery that wrote nothing) are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from kafka.errors import UnknownTopicOrPartitionError

from spotbatch.kafka_admin import read_all
from spotbatch.records import decode
from spotbatch.rollouts.gates import ShadowStats, VersionStats
from spotbatch.rollouts.records import Rollout, ShadowRecord

__all__ = ["Outcome", "Shadowed", "Window", "read_since", "outcomes", "shadows", "window"]


@dataclass(frozen=True)
class Outcome:
    """One status record that names a registry version."""

    job_id: Optional[str]
    ok: bool
    version: int
    route: str  # champion | challenger | pinned
    rows: int
    seconds: Optional[float]
    nan_rows: Optional[int]
    at_ms: int  # the record's Kafka timestamp
    source: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class Shadowed:
    at_ms: int
    record: ShadowRecord


@dataclass
class Window:
    """The stats one gate evaluation compares."""

    challenger: VersionStats = field(default_factory=VersionStats)  # challenger-routed jobs, this step
    champion: VersionStats = field(default_factory=VersionStats)  # champion-routed jobs, whole rollout
    shadow: ShadowStats = field(default_factory=ShadowStats)  # shadowed jobs, whole rollout


def read_since(bootstrap: str, topic: str, since_ms: int, *, client_options: Mapping | None = None,
               timeout_s: float = 30.0) -> list[Any]:
    """Records of ``topic`` stamped at or after ``since_ms``; none if the topic does not exist yet
    (no worker has written a status or shadow record so far)."""
    try:
        records = read_all(bootstrap, topic, timeout_s, since_ms=since_ms, client_options=client_options)
    except UnknownTopicOrPartitionError:
        return []
    return [r for r in records if r.timestamp >= since_ms]  # read_all may start early: see its docstring


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _seconds(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def outcomes(records: Iterable[Any], name: str) -> list[Outcome]:
    """The status records (``<jobs topic>.results``) of model ``name`` that name a version."""
    found = []
    for record in records:
        body = decode(record.value)
        if body is None or body.get("model") != name or body.get("already_done"):
            continue
        version, status = _int(body.get("model_version")), body.get("status")
        if version is None or status not in ("ok", "failed"):
            continue
        source = body.get("source")
        found.append(Outcome(job_id=body.get("job_id") if isinstance(body.get("job_id"), str) else None,
                             ok=status == "ok", version=version, route=str(body.get("route", "")),
                             rows=_int(body.get("rows")) or 0, seconds=_seconds(body.get("seconds")),
                             nan_rows=_int(body.get("nan_rows")), at_ms=record.timestamp,
                             source=source if isinstance(source, dict) else None))
    return found


def shadows(records: Iterable[Any], name: str) -> list[Shadowed]:
    """The shadow records (``<jobs topic>.shadow``) of model ``name``."""
    found = []
    for record in records:
        try:
            shadow = ShadowRecord.from_json(record.value)
        except (TypeError, ValueError, KeyError):
            continue
        if shadow.model == name:
            found.append(Shadowed(record.timestamp, shadow))
    return found


def window(rollout: Rollout, seen: Iterable[Outcome], shadowed: Iterable[Shadowed]) -> Window:
    """Fold what the workers reported into the stats of the rollout's current step.

    Only this rollout's pair counts: a champion job must be the champion version routed as
    champion, a challenger job the challenger routed as challenger (pinned jobs asked for a
    version by number and say nothing about the rollout)."""
    started_ms, step_ms = _ms(rollout.started_at), _ms(rollout.step_started_at)
    result = Window()
    for o in seen:
        if o.version == rollout.challenger and o.route == "challenger" and o.at_ms >= step_ms:
            result.challenger.add(ok=o.ok, rows=o.rows, seconds=o.seconds, nan_rows=o.nan_rows)
        elif o.version == rollout.champion and o.route == "champion" and o.at_ms >= started_ms:
            result.champion.add(ok=o.ok, rows=o.rows, seconds=o.seconds, nan_rows=o.nan_rows)
    for s in shadowed:
        r = s.record
        if r.champion == rollout.champion and r.challenger == rollout.challenger and s.at_ms >= started_ms:
            result.shadow.add(rows=r.rows, mean=r.mean, low=r.low, lowest=r.min)
    return result


def _ms(seconds: float) -> int:
    """Epoch seconds -> the millisecond Kafka stamps records with (floored, so a record
    stamped in the same millisecond as a step's start belongs to the step)."""
    return math.floor(seconds * 1000)
