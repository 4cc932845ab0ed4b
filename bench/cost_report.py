"""Cost report speed: how long the ledger and the report take for a month of usage.

Run:  .venv/bin/python bench/cost_report.py [--json] [--workers 20] [--days 30]
      [--interval-s 60] [--broker-records 20000]

Method:

1. In memory. ``--workers`` workers (half spot, half on-demand) each emit one usage
   record per ``--interval-s`` for ``--days`` days, as JSON bytes like the topic holds.
   Timed: ``decode_s`` (Ledger.from_values: parse, validate, de-duplicate), ``report_s``
   (compute_report over the whole month, with the hourly timeline), ``report_window_s``
   (the same over the last 24 h), ``csv_json_s`` and ``plot_s`` (the PNG), and
   ``decode_window_s``: decoding only what a read for the last 24 h decodes (records
   stamped, at their ``end``, from 24 h + LOOKBACK_MARGIN_S before the last end).
2. Through the broker. ``--broker-records`` of those records are published to a topic
   of the embedded broker (Tansu), each with its Kafka timestamp at its ``end`` (as a
   worker sends it), and ``read_ledger`` (no consumer group, up to the true log end)
   reads them back: ``read_s`` and records/s for the whole topic, ``window_read_s`` and
   ``window_decoded`` for a read of the last 24 h of those records (``--since -24h``:
   older records are passed over, not decoded). 0 skips it.

Wall-clock figures on whatever machine runs it; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spotbatch.scheduler.ledger import LOOKBACK_MARGIN_S, Ledger, Window, read_ledger  # noqa: E402
from spotbatch.scheduler.prices import InstancePrice  # noqa: E402
from spotbatch.scheduler.report import compute_report, plot_report, report_csv, report_json  # noqa: E402

PRICES = {"g5.xlarge": InstancePrice("g5.xlarge", 1.006, 0.3622, 1, "us-east-1")}
T0 = 1_764_460_800.0  # 2025-11-30T00:00:00Z


def synth(workers: int, days: float, interval_s: float) -> list[bytes]:
    n = int(days * 86400 / interval_s)
    out = []
    for w in range(workers):
        pool = "spot" if w % 2 == 0 else "on-demand"
        for i in range(n):
            start = T0 + i * interval_s
            out.append(json.dumps({
                "v": 1, "kind": "usage", "record_id": f"w{w}-{i}", "worker": f"w{w}", "pool": pool,
                "instance_type": "g5.xlarge", "gpus": 1, "start": start, "end": start + interval_s,
                "seconds_alive": interval_s, "seconds_busy": interval_s * 0.7, "rows": 3000, "jobs": 30,
                "interruptions": int(i == n - 1 and pool == "spot"), "rows_recomputed": 0,
                "final": i == n - 1, "at": start + interval_s}).encode())
    return out


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def in_memory(values: list[bytes], workers: int, days: float, interval_s: float) -> dict:
    ledger, decode_s = timed(lambda: Ledger.from_values(values))
    per_worker, end = len(values) // workers, T0 + days * 86400
    cutoff = end - 86400 - LOOKBACK_MARGIN_S  # synth's record k of a worker ends at T0 + (k + 1) * interval_s
    recent = [v for j, v in enumerate(values) if T0 + (j % per_worker + 1) * interval_s >= cutoff]
    part, decode_window_s = timed(lambda: Ledger.from_values(recent))
    report, report_s = timed(lambda: compute_report(ledger, PRICES, Window()))
    _, window_s = timed(lambda: compute_report(ledger, PRICES, Window(end - 86400, end)))
    _, out_s = timed(lambda: (report_csv(report), json.dumps(report_json(report))))
    with tempfile.TemporaryDirectory() as tmp:
        _, plot_s = timed(lambda: plot_report(report, Path(tmp) / "cost.png"))
    return {"records": len(values), "decode_s": round(decode_s, 3), "records_per_s": round(len(values) / decode_s),
            "decode_window_s": round(decode_window_s, 3), "window_decoded": part.decoded,
            "report_s": round(report_s, 3), "report_window_s": round(window_s, 3), "csv_json_s": round(out_s, 3),
            "plot_s": round(plot_s, 3), "timeline_points": len(report.timeline),
            "total_cost": round(report.total.cost, 2), "savings_fraction": round(report.savings_fraction, 4)}


def through_broker(values: list[bytes]) -> dict:
    from kafka import KafkaProducer

    from spotbatch.embedded import start_or_external
    from spotbatch.kafka_admin import ensure_topics

    with start_or_external() as broker:
        topic = f"bench-usage-{uuid.uuid4().hex[:8]}"
        ensure_topics(broker.bootstrap, {topic: 1})
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20)
        last_end = 0.0
        for value in values:
            end = json.loads(value)["end"]
            last_end = max(last_end, end)
            producer.send(topic, value, timestamp_ms=int(end * 1000))
        producer.flush(timeout=120)
        producer.close()
        ledger, read_s = timed(lambda: read_ledger(broker.bootstrap, topic, timeout_s=300))
        window = Window(last_end - 86400, last_end)
        part, window_read_s = timed(lambda: read_ledger(broker.bootstrap, topic, window=window, timeout_s=300))
    if part.totals(window) != ledger.totals(window):
        raise SystemExit("windowed read disagrees with the full read")
    return {"records": len(ledger.records), "read_s": round(read_s, 3), "records_per_s": round(len(values) / read_s),
            "window_read_s": round(window_read_s, 3), "window_decoded": part.decoded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=20)
    ap.add_argument("--days", type=float, default=30)
    ap.add_argument("--interval-s", type=float, default=60)
    ap.add_argument("--broker-records", type=int, default=20_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    values = synth(args.workers, args.days, args.interval_s)
    result = {"workers": args.workers, "days": args.days, "interval_s": args.interval_s,
              "in_memory": in_memory(values, args.workers, args.days, args.interval_s)}
    if args.broker_records:
        result["broker"] = through_broker(values[: args.broker_records])
    if args.json:
        print(json.dumps(result))
        return
    for section in ("in_memory", "broker"):
        if section in result:
            print(section + ": " + ", ".join(f"{k}={v}" for k, v in result[section].items()))


if __name__ == "__main__":
    main()
