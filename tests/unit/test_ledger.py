"""The usage ledger: de-duplication, skipping, window clipping, timelines."""

from __future__ import annotations

import json

import pytest

from spotbatch.scheduler.ledger import Ledger, LedgerError, UsageRecord, Window, parse_when

T0 = 1_764_500_000.0


def usage(seq: int, start: float, end: float, *, worker: str = "w1", pool: str = "spot", itype: str = "g5.xlarge",
          gpus: int = 1, busy: float | None = None, rows: int = 0, jobs: int = 0, interruptions: int = 0,
          recomputed: int = 0, final: bool = False) -> dict:
    return {"v": 1, "kind": "usage", "record_id": f"{worker}-{seq}", "worker": worker, "pool": pool,
            "instance_type": itype, "gpus": gpus, "start": start, "end": end, "seconds_alive": end - start,
            "seconds_busy": (end - start) / 2 if busy is None else busy, "rows": rows, "jobs": jobs,
            "interruptions": interruptions, "rows_recomputed": recomputed, "final": final, "at": end}


def test_duplicates_count_once_and_other_kinds_are_skipped():
    first = usage(0, T0, T0 + 60, rows=100)
    values = [json.dumps(first).encode(), json.dumps(first).encode(),  # a redelivery
              json.dumps({"kind": "interruption", "worker": "w1", "rows_lost": 3}).encode(),
              json.dumps({**usage(1, T0, T0 + 1), "v": 2}).encode(),  # a future version
              b"not json", json.dumps({**usage(2, T0, T0 + 1), "pool": "reserved"}).encode(),
              json.dumps({**usage(3, T0, T0 + 1), "rows": -1})]
    ledger = Ledger.from_values(values)
    assert [r.record_id for r in ledger.records] == ["w1-0"]
    assert (ledger.duplicates, ledger.skipped, ledger.malformed) == (1, 2, 3)
    (sums,) = ledger.totals(Window()).values()
    assert (sums.alive_s, sums.rows, sums.records) == (60, 100, 1)


def test_totals_group_by_pool_and_type_and_add_up():
    ledger = Ledger.from_values([
        usage(0, T0, T0 + 60, rows=10, jobs=1), usage(1, T0 + 60, T0 + 90, rows=5, final=True, interruptions=1, recomputed=4),
        usage(0, T0, T0 + 120, worker="w2", pool="on-demand", gpus=4, itype="g5.12xlarge", rows=30),
    ])
    sums = ledger.totals(Window())
    spot = sums[("spot", "g5.xlarge")]
    assert (spot.alive_s, spot.busy_s, spot.gpu_s, spot.rows, spot.jobs) == (90, 45, 90, 15, 1)
    assert (spot.interruptions, spot.rows_recomputed, spot.workers) == (1, 4, {"w1"})
    assert sums[("on-demand", "g5.12xlarge")].gpu_s == 480


def test_window_clips_pro_rata_and_counts_events_at_the_end():
    rec = usage(0, T0, T0 + 100, rows=100, busy=40, interruptions=1, recomputed=9)
    ledger = Ledger.from_values([rec])
    (inside,) = ledger.totals(Window(T0 + 25, T0 + 75)).values()  # the middle half
    assert (inside.alive_s, inside.busy_s, inside.rows) == (50, 20, 50)
    assert (inside.interruptions, inside.rows_recomputed) == (0, 0)  # the end is outside
    (tail,) = ledger.totals(Window(T0 + 90, None)).values()
    assert (tail.alive_s, tail.interruptions, tail.rows_recomputed) == (pytest.approx(10), 1, 9)
    assert ledger.totals(Window(T0 + 100, T0 + 200)) == {}  # the end on `since` belongs to the window before
    (whole,) = ledger.totals(Window(T0, T0 + 100)).values()
    assert (whole.alive_s, whole.rows, whole.interruptions) == (100, 100, 1)
    assert ledger.totals(Window(None, T0)) == {}


def test_zero_length_record_counts_when_inside():
    ledger = Ledger.from_values([usage(0, T0, T0, final=True, interruptions=1)])
    assert ledger.totals(Window(T0 - 1, T0 + 1))[("spot", "g5.xlarge")].interruptions == 1
    assert ledger.totals(Window(T0 + 1, T0 + 2)) == {}


def test_timeline_buckets_add_up_to_the_totals():
    ledger = Ledger.from_values([usage(0, T0, T0 + 150), usage(1, T0 + 150, T0 + 200),
                                 usage(0, T0 + 50, T0 + 110, worker="w2", pool="on-demand")])
    buckets = ledger.timeline(Window(), bucket_s=60)
    assert [start - T0 for start, _ in buckets] == [0, 60, 120, 180]
    assert buckets[0][1] == {("spot", "g5.xlarge"): pytest.approx(60), ("on-demand", "g5.xlarge"): pytest.approx(10)}
    spot_total = sum(sums.get(("spot", "g5.xlarge"), 0) for _, sums in buckets)
    assert spot_total == pytest.approx(ledger.totals(Window())[("spot", "g5.xlarge")].alive_s)


def test_timeline_clips_to_the_window():
    ledger = Ledger.from_values([usage(0, T0, T0 + 1000)])
    buckets = ledger.timeline(Window(T0 + 100, T0 + 220), bucket_s=60)
    assert [start - T0 for start, _ in buckets] == [100, 160]
    assert sum(s[("spot", "g5.xlarge")] for _, s in buckets) == pytest.approx(120)
    assert Ledger([]).timeline(Window(), 60) == []


def test_parse_when():
    now = 1_800_000_000.0
    assert parse_when("-24h", now=now) == now - 86400
    assert parse_when("-90m", now=now) == now - 5400
    assert parse_when("now", now=now) == now
    assert parse_when("2026-11-30T00:00:00Z", now=now) == parse_when("2026-11-30T00:00:00", now=now)
    assert parse_when("2026-11-30T01:00:00+01:00", now=now) == parse_when("2026-11-30T00:00:00Z", now=now)
    with pytest.raises(LedgerError, match="ISO 8601"):
        parse_when("yesterday", now=now)
    with pytest.raises(LedgerError, match="after --since"):
        Window.parse("-1h", "-2h", now=now)


def test_record_validation():
    with pytest.raises(ValueError):
        UsageRecord.parse({**usage(0, T0 + 10, T0), "seconds_alive": 1})  # ends before it starts
    with pytest.raises(KeyError):
        UsageRecord.parse({k: v for k, v in usage(0, T0, T0 + 1).items() if k != "gpus"})


def test_timestamp_lookup_falls_back_to_the_start_where_the_broker_cannot_say():
    from kafka import TopicPartition
    from kafka.errors import UnsupportedVersionError
    from kafka.structs import OffsetAndTimestamp

    from spotbatch.kafka_admin import _offsets_at

    tps = [TopicPartition("u", p) for p in range(4)]
    ends = dict.fromkeys(tps, 50)
    answers = {tps[0]: OffsetAndTimestamp(7, 1_000, -1),  # usable
               tps[1]: None,  # no record that new: read from the start
               tps[2]: OffsetAndTimestamp(9, 999, -1),  # older than asked: not trusted
               tps[3]: OffsetAndTimestamp(80, 2_000, -1)}  # beyond the end read: clamped

    class Consumer:
        def __init__(self, answer):
            self.answer = answer

        def offsets_for_times(self, query):
            assert set(query.values()) == {1_000}
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    assert _offsets_at(Consumer(answers), tps, 1_000, ends) == {tps[0]: 7, tps[3]: 50}
    assert _offsets_at(Consumer(UnsupportedVersionError("too old")), tps, 1_000, ends) == {}
