"""Scaler speed: lag + replicas for a group over 1, 64 and 512 partitions, and the
external scaler's GetMetrics latency under 50 concurrent callers.

Run:  .venv/bin/python bench/scaler.py [--json] [--partitions 1,64,512] [--repeats 20]
      [--records-per-partition 20] [--concurrency 50] [--calls-per-client 20]
      [--uncached-calls-per-client 2]

Everything runs against its own embedded broker (Tansu). Method:

1. Lag. Per partition count N: a fresh topic of N partitions, ``--records-per-partition``
   records in each (linger batches, so the true log end comes from a fetch), a group
   that committed half of each partition. ``cold_ms``: a new OffsetReader (connect +
   metadata) + committed offsets + true log ends + compute_lag + keda_replicas, once.
   ``warm_ms``: the same with the reader kept (what the scaler pays per cache miss),
   ``--repeats`` times: p50 and max.
2. GetMetrics. ``scaler serve`` in-process on a free port (gRPC over loopback), the 64-
   partition group; ``--concurrency`` client threads, each with its own channel, call
   GetMetrics ``--calls-per-client`` times back to back after one warm-up call each.
   Latency is per call, client side: p50, p99, max. Run twice: with the default 2 s
   offsets cache (what KEDA sees), and with ``cache_s=0`` (every call reads the broker,
   calls for the same group serialised by the per-group lock; ``--uncached-calls-per-client``
   calls each), with ``broker_reads``.

The figures are wall-clock on whatever machine runs it; on a shared 2-core machine the
client threads and the server share the cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka.structs import OffsetAndMetadata  # noqa: E402

from spotbatch.embedded import start_or_external  # noqa: E402
from spotbatch.kafka_admin import OffsetReader, ensure_topics  # noqa: E402
from spotbatch.scaler import policy  # noqa: E402
from spotbatch.scaler.lag import LagOptions, compute_lag, read_offsets  # noqa: E402
from spotbatch.scaler.proto import externalscaler_pb2 as pb  # noqa: E402
from spotbatch.scaler.proto import externalscaler_pb2_grpc as pb_grpc  # noqa: E402
from spotbatch.scaler.service import LagSource, serve  # noqa: E402


def prepare(bootstrap: str, partitions: int, records: int) -> tuple[str, str]:
    topic, group = f"bench-{partitions}-{uuid.uuid4().hex[:8]}", f"bench-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: partitions}, timeout_s=60)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
    for p in range(partitions):
        for _ in range(records):
            producer.send(topic, b"x" * 32, partition=p)
    producer.flush(timeout=120)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(records // 2, "", -1) for p in range(partitions)})
    consumer.close()
    return topic, group


def lag_once(reader: OffsetReader, group: str, topic: str, options: LagOptions) -> int:
    committed, ends = read_offsets(reader, group, topic)
    result = compute_lag(committed, ends, options)
    metric = policy.lag_metric(result.total_lag, result.active, options.lag_threshold)
    policy.keda_replicas(metric, None, policy.ReplicaBounds())
    return result.total_lag_with_persistent


def bench_lag(bootstrap: str, partitions: int, args) -> tuple[dict, str, str]:
    topic, group = prepare(bootstrap, partitions, args.records_per_partition)
    options = LagOptions()
    t0 = time.perf_counter()
    reader = OffsetReader(bootstrap)
    lag = lag_once(reader, group, topic, options)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        lag_once(reader, group, topic, options)
        warm.append(time.perf_counter() - t)
    reader.close()
    expected = partitions * (args.records_per_partition - args.records_per_partition // 2)
    return ({"partitions": partitions, "lag": lag, "lag_expected": expected, "cold_ms": cold * 1e3,
             "warm_p50_ms": statistics.median(warm) * 1e3, "warm_max_ms": max(warm) * 1e3}, topic, group)


def bench_grpc(bootstrap: str, topic: str, group: str, cache_s: float, calls_per_client: int, args) -> dict:
    source = LagSource(cache_s=cache_s)
    server = serve(port=0, metrics_port=None, host="127.0.0.1", source=source, max_workers=args.concurrency + 8)
    meta = {"bootstrapServers": bootstrap, "consumerGroup": group, "topic": topic}
    request = pb.GetMetricsRequest(scaledObjectRef=pb.ScaledObjectRef(name="bench", namespace="b", scalerMetadata=meta))
    latencies: list[float] = []
    lock, start = threading.Lock(), threading.Barrier(args.concurrency)

    def client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            stub.GetMetrics(request)  # warm-up: channel connect
            start.wait()
            mine = []
            for _ in range(calls_per_client):
                t = time.perf_counter()
                stub.GetMetrics(request)
                mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server.stop(grace_s=0)
    latencies.sort()
    return {"cache_s": cache_s, "concurrency": args.concurrency, "calls": len(latencies),
            "p50_ms": _pct(latencies, 50) * 1e3, "p99_ms": _pct(latencies, 99) * 1e3,
            "max_ms": latencies[-1] * 1e3, "calls_per_s": len(latencies) / wall, "broker_reads": source.broker_reads}


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--partitions", default="1,64,512")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--records-per-partition", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--calls-per-client", type=int, default=20)
    ap.add_argument("--uncached-calls-per-client", type=int, default=2, help="for the cache_s=0 run (0 skips it)")
    args = ap.parse_args()
    sizes = [int(n) for n in args.partitions.split(",")]
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    report: dict = {"lag": [], "get_metrics": []}
    with start_or_external() as broker:
        groups = {}
        for n in sizes:
            say(f"lag over {n} partitions ...")
            row, topic, group = bench_lag(broker.bootstrap, n, args)
            report["lag"].append(row)
            groups[n] = (topic, group)
        n = 64 if 64 in groups else sizes[0]
        runs = [(2.0, args.calls_per_client)] + ([(0.0, args.uncached_calls_per_client)]
                                                 if args.uncached_calls_per_client else [])
        for cache_s, calls in runs:
            say(f"GetMetrics x {args.concurrency} concurrent, cache_s={cache_s} ...")
            report["get_metrics"].append({"partitions": n, **bench_grpc(broker.bootstrap, *groups[n], cache_s, calls, args)})
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    bad = [r for r in report["lag"] if r["lag"] != r["lag_expected"]]
    return 1 if bad else 0  # a wrong lag is a failed run, not a figure


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    lag = Table(title="lag + replicas for one group")
    for col in ("partitions", "lag (expected)", "cold ms", "warm p50 ms", "warm max ms"):
        lag.add_column(col, justify="right")
    for r in report["lag"]:
        lag.add_row(str(r["partitions"]), f"{r['lag']} ({r['lag_expected']})", f"{r['cold_ms']:.1f}",
                    f"{r['warm_p50_ms']:.1f}", f"{r['warm_max_ms']:.1f}")
    rpc = Table(title="GetMetrics latency under concurrent callers")
    for col in ("partitions", "cache s", "clients", "calls", "p50 ms", "p99 ms", "max ms", "calls/s", "broker reads"):
        rpc.add_column(col, justify="right")
    for r in report["get_metrics"]:
        rpc.add_row(str(r["partitions"]), f"{r['cache_s']:g}", str(r["concurrency"]), str(r["calls"]),
                    f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['max_ms']:.2f}", f"{r['calls_per_s']:.0f}",
                    str(r["broker_reads"]))
    console = Console()
    console.print(lag)
    console.print(rpc)


if __name__ == "__main__":
    raise SystemExit(main())
