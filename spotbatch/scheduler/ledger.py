"""The usage ledger: workers' usage records, de-duplicated, clipped to a time window.

Records come from the usage topic (the schema: spotbatch.records.UsageRecord).
Each covers a disjoint interval [start, end) of one worker's life, so sums over
distinct ``record_id`` add up; a redelivered record counts once. Other kinds on the
topic (``interruption``) and unknown versions are skipped, malformed values counted.

Window rule: seconds, rows and jobs spread evenly over a record's interval and count
pro rata to its overlap with the window [since, until); interruptions and rows
recomputed happen at a record's end and count when the end lies in (since, until], so
a record wholly inside a window counts in full and adjacent windows split it exactly.

Reading: a record is published when the interval it covers ends, so one that touches
a window starting at ``since`` has a Kafka timestamp >= since, give or take clock
skew. ``read_ledger`` with a window therefore reads each partition only from the first
record stamped >= since - LOOKBACK_MARGIN_S, and decodes only records stamped so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from spotbatch.durations import DurationError, parse_duration_s
from spotbatch.records import POOLS, NotOurs, UsageRecord, parse_usage

__all__ = ["UsageRecord", "Window", "Usage", "Ledger", "LedgerError", "parse_when", "read_ledger", "POOLS", "LOOKBACK_MARGIN_S",
           "share", "ends_in"]

_RELATIVE_UNITS = ("s", "m", "h", "d", "w")  # --since -90s ... -2w
# How far before ``since`` a windowed read starts, by Kafka timestamp. A record's
# timestamp is the producer's wall clock at send (the interval's end, see
# spotbatch/workers/usage.py), its ``end`` the worker's anchored clock: they differ by
# skew between machines and by wall-clock steps since the worker started. 10 minutes
# covers both with room; the cost of more is only records read and dropped.
LOOKBACK_MARGIN_S = 600.0


class LedgerError(ValueError):
    """A bad window or an unreadable topic; one line that says the fix."""


def share(rec: UsageRecord, window: Window) -> float:
    """The fraction of a record's interval inside ``window`` (0..1)."""
    lo, hi = window.bounds()
    if rec.end == rec.start:  # an instant: in or out, by the same rule as events
        return 1.0 if ends_in(rec, window) else 0.0
    overlap = min(rec.end, hi) - max(rec.start, lo)
    return max(0.0, overlap) / (rec.end - rec.start)


def ends_in(rec: UsageRecord, window: Window) -> bool:
    """Whether a record's end lies in (since, until]: adjacent windows split events exactly."""
    lo, hi = window.bounds()
    return lo < rec.end <= hi


@dataclass(frozen=True)
class Window:
    """[since, until) in epoch seconds; None is open on that side."""

    since: float | None = None
    until: float | None = None

    def bounds(self) -> tuple[float, float]:
        return (-math.inf if self.since is None else self.since, math.inf if self.until is None else self.until)

    @classmethod
    def parse(cls, since: str | None, until: str | None, *, now: float | None = None) -> Window:
        now = time.time() if now is None else now
        window = cls(parse_when(since, now=now) if since else None, parse_when(until, now=now) if until else None)
        if window.since is not None and window.until is not None and window.until <= window.since:
            raise LedgerError(f"--until ({until}) must be after --since ({since})")
        return window


def parse_when(text: str, *, now: float) -> float:
    """``-24h``/``-30m``/``-7d`` (before ``now``), ``now``, or ISO 8601 (UTC if no zone)."""
    text = text.strip()
    if text == "now":
        return now
    if text.startswith("-"):
        try:
            return now - parse_duration_s(text[1:], units=_RELATIVE_UNITS, bare=False)
        except DurationError:
            pass  # not relative: ISO 8601, or the error below
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise LedgerError(f"time {text!r} is not ISO 8601 or relative; use e.g. 2026-11-30T08:00:00Z or -24h") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


@dataclass
class Usage:
    """Sums over records (pro rata inside a window)."""

    records: int = 0
    alive_s: float = 0.0
    busy_s: float = 0.0
    gpu_s: float = 0.0
    rows: float = 0.0
    jobs: float = 0.0
    interruptions: int = 0
    rows_recomputed: int = 0
    workers: set[str] = field(default_factory=set)

    def add(self, rec: UsageRecord, share: float, ends_inside: bool) -> None:
        self.records += 1
        self.alive_s += rec.seconds_alive * share
        self.busy_s += rec.seconds_busy * share
        self.gpu_s += rec.seconds_alive * share * rec.gpus
        self.rows += rec.rows * share
        self.jobs += rec.jobs * share
        if ends_inside:
            self.interruptions += rec.interruptions
            self.rows_recomputed += rec.rows_recomputed
        self.workers.add(rec.worker)


@dataclass
class Ledger:
    records: list[UsageRecord]
    duplicates: int = 0  # redelivered records (same record_id) ignored
    skipped: int = 0  # other kinds (interruption) or versions this reader does not know
    malformed: int = 0
    decoded: int = 0  # values looked at: a windowed read passes over older records undecoded

    @classmethod
    def from_values(cls, values: Iterable[bytes | str | Mapping[str, Any]]) -> Ledger:
        ledger, seen = cls([]), set()
        for value in values:
            ledger.decoded += 1
            try:
                rec = parse_usage(value)
            except NotOurs:
                ledger.skipped += 1
                continue
            except (KeyError, ValueError):
                ledger.malformed += 1
                continue
            if rec.record_id in seen:
                ledger.duplicates += 1
                continue
            seen.add(rec.record_id)
            ledger.records.append(rec)
        return ledger

    def within(self, window: Window) -> list[tuple[UsageRecord, float]]:
        """(record, share) for every record that touches the window."""
        pairs = [(rec, share(rec, window)) for rec in self.records]
        return [(rec, part) for rec, part in pairs if part > 0 or ends_in(rec, window)]

    def totals(self, window: Window) -> dict[tuple[str, str], Usage]:
        """Usage per (pool, instance type) inside the window."""
        out: dict[tuple[str, str], Usage] = {}
        for rec, part in self.within(window):
            out.setdefault((rec.pool, rec.instance_type), Usage()).add(rec, part, ends_in(rec, window))
        return out

    def span(self, window: Window) -> tuple[float, float] | None:
        """The window clipped to the records' first start and last end (None: no records)."""
        touched = self.within(window)
        if not touched:
            return None
        lo, hi = window.bounds()
        return max(lo, min(r.start for r, _ in touched)), min(hi, max(r.end for r, _ in touched))

    def timeline(self, window: Window, bucket_s: float) -> list[tuple[float, dict[tuple[str, str], float]]]:
        """Alive seconds per (pool, instance type) in consecutive buckets of the window."""
        span = self.span(window)
        if span is None:
            return []
        lo, hi = span
        buckets: list[tuple[float, dict[tuple[str, str], float]]] = [
            (lo + i * bucket_s, {}) for i in range(max(1, math.ceil((hi - lo) / bucket_s)))]
        for rec in self.records:  # each record visits only the buckets it overlaps
            if rec.end <= lo or rec.start >= hi:
                continue
            first = max(0, int((rec.start - lo) // bucket_s))
            last = min(len(buckets) - 1, int((rec.end - lo) // bucket_s))
            for start, sums in buckets[first:last + 1]:
                part = share(rec, Window(start, start + bucket_s))
                if part > 0:
                    key = (rec.pool, rec.instance_type)
                    sums[key] = sums.get(key, 0.0) + rec.seconds_alive * part
        return buckets


def read_ledger(bootstrap: str, topic: str, *, window: Window | None = None, timeout_s: float = 30.0,
                client_options: Mapping | None = None) -> Ledger:
    """The usage records on ``topic`` up to its current end (no consumer group).

    Without a window (or one with no ``since``): every record. With one: only the records
    that can touch it, those with a Kafka timestamp >= since - LOOKBACK_MARGIN_S; each
    partition is read from the first such offset where the broker can say (else from its
    start), and older records read anyway are dropped before decoding, so the window's
    figures are the same either way and the same as from a full read.
    """
    from kafka.errors import KafkaError  # kafka stays off the import path of pure users

    from spotbatch.kafka_admin import read_all

    since_ms = None
    if window is not None and window.since is not None:
        since_ms = max(0, math.floor((window.since - LOOKBACK_MARGIN_S) * 1000))
    try:
        records = read_all(bootstrap, topic, timeout_s=timeout_s, since_ms=since_ms, client_options=client_options)
    except KafkaError as exc:
        detail = str(exc) if type(exc).__name__ in str(exc) else f"{type(exc).__name__}: {exc}"
        raise LedgerError(f"cannot read usage topic {topic!r} at {bootstrap} ({detail}); "
                          f"check --bootstrap and --usage-topic") from None
    if since_ms is not None:  # a record without a timestamp (< 0) is kept
        records = [r for r in records if r.timestamp is None or r.timestamp < 0 or r.timestamp >= since_ms]
    return Ledger.from_values(r.value for r in records)
