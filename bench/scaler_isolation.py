"""Scaler trigger isolation: a healthy trigger's GetMetrics latency while another
trigger's bootstrapServers accepts connections and never answers.

Run:  .venv/bin/python bench/scaler_isolation.py [--json] [--calls 200] [--groups 8]
      [--dead-triggers 1] [--call-timeout-s 3] [--cache-s 0]

Method: an embedded broker (Tansu), a 4-partition topic and ``--groups`` consumer groups
that committed offset 0. ``scaler serve`` in-process (gRPC over loopback), with
``--cache-s`` (default 0: every healthy call reads the broker) and ``--call-timeout-s``.
A listener on 127.0.0.1 that accepts and never answers is the dead Kafka. Phase
``baseline``: ``--calls`` GetMetrics for the healthy triggers (round robin over the
groups, one client, back to back). Phase ``with_dead``: ``--dead-triggers`` threads
call GetMetrics for a trigger on the dead Kafka in a loop (each call ends UNAVAILABLE
at the call timeout), and the same healthy calls run again, each for a group the
scaler has not seen yet in this phase (new groups). Latency is per call, client side.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
from kafka import KafkaConsumer, TopicPartition  # noqa: E402
from kafka.structs import OffsetAndMetadata  # noqa: E402

from spotbatch.embedded import start_or_external  # noqa: E402
from spotbatch.kafka_admin import ensure_topics  # noqa: E402
from spotbatch.scaler.proto import externalscaler_pb2 as pb  # noqa: E402
from spotbatch.scaler.proto import externalscaler_pb2_grpc as pb_grpc  # noqa: E402
from spotbatch.scaler.service import LagSource, serve  # noqa: E402


def _request(bootstrap: str, group: str, topic: str) -> pb.GetMetricsRequest:
    meta = {"bootstrapServers": bootstrap, "consumerGroup": group, "topic": topic}
    return pb.GetMetricsRequest(scaledObjectRef=pb.ScaledObjectRef(name="bench", namespace="b", scalerMetadata=meta))


def _groups(bootstrap: str, topic: str, n: int) -> list[str]:
    groups = [f"iso-{uuid.uuid4().hex[:8]}" for _ in range(n)]
    for group in groups:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(0, "", -1) for p in range(4)})
        consumer.close()
    return groups


def _dead_listener() -> tuple[socket.socket, str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return listener, f"127.0.0.1:{listener.getsockname()[1]}"


def _healthy(stub, bootstrap: str, topic: str, groups: list[str], calls: int) -> list[float]:
    latencies = []
    for i in range(calls):
        request = _request(bootstrap, groups[i % len(groups)], topic)
        t = time.perf_counter()
        stub.GetMetrics(request, timeout=120)
        latencies.append(time.perf_counter() - t)
    return sorted(latencies)


def _stats(latencies: list[float]) -> dict:
    return {"calls": len(latencies), "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": _pct(latencies, 99) * 1e3, "max_ms": latencies[-1] * 1e3}


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--calls", type=int, default=200, help="healthy GetMetrics calls per phase")
    ap.add_argument("--groups", type=int, default=8, help="healthy triggers (consumer groups) per phase")
    ap.add_argument("--dead-triggers", type=int, default=1)
    ap.add_argument("--call-timeout-s", type=float, default=3.0)
    ap.add_argument("--cache-s", type=float, default=0.0)
    args = ap.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    report: dict = {"call_timeout_s": args.call_timeout_s, "cache_s": args.cache_s,
                    "dead_triggers": args.dead_triggers}
    listener, dead = _dead_listener()
    with start_or_external() as broker:
        topic = f"iso-{uuid.uuid4().hex[:8]}"
        ensure_topics(broker.bootstrap, {topic: 4}, timeout_s=60)
        source = LagSource(cache_s=args.cache_s, call_timeout_s=args.call_timeout_s)
        server = serve(port=0, metrics_port=None, host="127.0.0.1", source=source)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = pb_grpc.ExternalScalerStub(channel)
        try:
            say("baseline: healthy triggers only ...")
            stub.GetMetrics(_request(broker.bootstrap, _groups(broker.bootstrap, topic, 1)[0], topic))  # connect
            report["baseline"] = _stats(_healthy(stub, broker.bootstrap, topic,
                                                 _groups(broker.bootstrap, topic, args.groups), args.calls))
            stop, codes, lock = threading.Event(), {}, threading.Lock()

            def dead_loop(i: int) -> None:
                with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                    dead_stub = pb_grpc.ExternalScalerStub(ch)
                    while not stop.is_set():
                        t = time.perf_counter()
                        try:
                            dead_stub.GetMetrics(_request(dead, f"dead-{i}", topic), timeout=120)
                            code = "OK"
                        except grpc.RpcError as exc:
                            code = exc.code().name
                        with lock:
                            codes.setdefault(code, []).append(time.perf_counter() - t)

            fresh = _groups(broker.bootstrap, topic, args.groups)
            threads = [threading.Thread(target=dead_loop, args=(i,), daemon=True) for i in range(args.dead_triggers)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 5
            while len(source._inflight) < args.dead_triggers and time.monotonic() < deadline:
                time.sleep(0.01)  # the dead reads have begun
            say(f"with {args.dead_triggers} dead trigger(s): healthy triggers (new groups) ...")
            t0 = time.perf_counter()
            report["with_dead"] = _stats(_healthy(stub, broker.bootstrap, topic, fresh, args.calls))
            report["with_dead"]["wall_s"] = time.perf_counter() - t0
            stop.set()
            for t in threads:
                t.join(args.call_timeout_s + 10)
            report["dead_calls"] = {code: {"calls": len(v), "p50_ms": statistics.median(v) * 1e3}
                                    for code, v in codes.items()}
        finally:
            channel.close()
            server.stop(grace_s=0)
    listener.close()
    if args.json:
        print(json.dumps(report))
    else:
        for phase in ("baseline", "with_dead"):
            r = report[phase]
            print(f"{phase:10s} healthy GetMetrics: {r['calls']} calls, p50 {r['p50_ms']:.2f} ms, "
                  f"p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms")
        print(f"dead trigger calls: {report['dead_calls']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
