"""The KEDA external scaler: a gRPC ``externalscaler.ExternalScaler`` over our lag.

KEDA passes the trigger's metadata on every call; we parse it (``parse_metadata``),
read the group's offsets (cached per (bootstrap, group, topic) for ``cache_s``, so 50
concurrent polls cost one broker round trip), and answer:

- GetMetricSpec: one metric, ``spotbatch-<mode>-<topic or group>[-<pool>]``, target
  lagThreshold (lag mode) or rows/s per replica x drainSeconds (work mode);
- GetMetrics: the metric value (float and the deprecated int); the HPA then wants
  ceil(value / target) replicas;
- IsActive / StreamIsActive: KEDA's activation (the stream sends each change).

With ``pool: spot|on-demand`` in the metadata, an injected ``PoolSplitter`` gives the
pool's share of the total and we serve ``share x target`` (active = share > 0).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spotbatch.scaler import policy
from spotbatch.scaler.lag import LagError, LagOptions, compute_lag, read_offsets
from spotbatch.scaler.proto import externalscaler_pb2 as pb
from spotbatch.scaler.proto import externalscaler_pb2_grpc as pb_grpc

__all__ = [
    "PoolSplitter",
    "MetadataError",
    "ScalerRequest",
    "Reading",
    "LagSource",
    "ExternalScalerServicer",
    "ScalerServer",
    "parse_metadata",
    "metric_name",
    "serve",
]

log = logging.getLogger("spotbatch.scaler")

SERVICE_NAME = "externalscaler.ExternalScaler"
POOLS = ("spot", "on-demand")
DEFAULT_DRAIN_S = 300.0
DEFAULT_ROWS_PER_S = 100.0


class PoolSplitter(Protocol):
    def replicas(self, pool: str, desired_total: int, metadata: Mapping[str, str]) -> int: ...


class MetadataError(ValueError):
    """Bad scalerMetadata; the message is one line with the fix."""


@dataclass(frozen=True, kw_only=True)
class ScalerRequest:
    bootstrap: str
    group: str
    topic: str | None
    mode: Literal["lag", "work"] = "lag"
    options: LagOptions = field(default_factory=LagOptions)
    drain_s: float = DEFAULT_DRAIN_S
    rows_per_s: float = DEFAULT_ROWS_PER_S  # per replica, until workers report
    pool: str | None = None


@dataclass(frozen=True)
class Reading:
    value: float  # the metric served (a pool's share x target when a pool is named)
    target: float
    active: bool
    total_lag: int
    pending_rows: int | None  # work mode only
    rows_per_s: float | None  # work mode only: the per-replica rate used
    desired_total: int  # replicas the whole group would want (ceil(metric / target))
    partitions: int


_BOOL = {"true": True, "false": False}
_INT_KEYS = {"lagThreshold": "lag_threshold", "activationLagThreshold": "activation_lag_threshold"}
_BOOL_KEYS = {"allowIdleConsumers": "allow_idle_consumers", "excludePersistentLag": "exclude_persistent_lag",
              "scaleToZeroOnInvalidOffset": "scale_to_zero_on_invalid_offset",
              "limitToPartitionsWithLag": "limit_to_partitions_with_lag",
              "ensureEvenDistributionOfPartitions": "ensure_even_distribution_of_partitions"}


def parse_metadata(meta: Mapping[str, str], *, default_bootstrap: str | None = None) -> ScalerRequest:
    """The trigger metadata as a request; MetadataError names the key and the fix.

    Keys we do not know (scalerAddress, enableTLS, ...) belong to KEDA: ignored.
    """
    bootstrap = meta.get("bootstrapServers") or default_bootstrap
    if not bootstrap:
        raise MetadataError("metadata bootstrapServers is missing; set it to the Kafka bootstrap (host:port[,host:port])")
    group = meta.get("consumerGroup")
    if not group:
        raise MetadataError("metadata consumerGroup is missing; set it to the workers' consumer group")
    mode = meta.get("mode", "lag")
    if mode not in ("lag", "work"):
        raise MetadataError(f"metadata mode={mode!r} is not lag or work; use mode: lag (KEDA's lag) or mode: work")
    pool = meta.get("pool") or None
    if pool is not None and pool not in POOLS:
        raise MetadataError(f"metadata pool={pool!r} is not one of {', '.join(POOLS)}")
    opts: dict = {k: _int(meta, key) for key, k in _INT_KEYS.items() if key in meta}
    opts.update({k: _bool(meta, key) for key, k in _BOOL_KEYS.items() if key in meta})
    if "offsetResetPolicy" in meta:
        opts["offset_reset_policy"] = meta["offsetResetPolicy"]
    topic = meta.get("topic") or None
    try:
        options = LagOptions(**opts)
    except LagError as exc:
        raise MetadataError(f"metadata: {exc}") from None
    if options.limit_to_partitions_with_lag and topic is None:
        raise MetadataError("metadata limitToPartitionsWithLag needs a topic; set topic")
    return ScalerRequest(bootstrap=bootstrap, group=group, topic=topic, mode=mode, options=options,
                         drain_s=_positive(meta, "drainSeconds", DEFAULT_DRAIN_S),
                         rows_per_s=_positive(meta, "rowsPerSecond", DEFAULT_ROWS_PER_S), pool=pool)


def _int(meta: Mapping[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise MetadataError(f"metadata {key}={meta[key]!r} is not an integer; give a whole number") from None


def _bool(meta: Mapping[str, str], key: str) -> bool:
    value = _BOOL.get(meta[key].strip().lower())
    if value is None:
        raise MetadataError(f"metadata {key}={meta[key]!r} is not a boolean; use \"true\" or \"false\"")
    return value


def _positive(meta: Mapping[str, str], key: str, default: float) -> float:
    if key not in meta:
        return default
    try:
        value = float(meta[key])
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise MetadataError(f"metadata {key}={meta[key]!r} must be a number > 0")
    return value


def metric_name(request: ScalerRequest) -> str:
    """``spotbatch-<mode>-<topic or group>[-<pool>]``, valid as a Kubernetes metric name
    (KEDA adds its ``s<index>-`` prefix)."""
    parts = ["spotbatch", request.mode, request.topic or request.group] + ([request.pool] if request.pool else [])
    return re.sub(r"[^a-z0-9.-]+", "-", "-".join(parts).lower())


def _strip_keda_prefix(name: str) -> str:
    return re.sub(r"^s\d+-", "", name)


@dataclass
class _Offsets:
    committed: dict
    ends: dict
    previous: dict | None  # committed offsets of the read before (excludePersistentLag)
    at: float


class LagSource:
    """Readings for requests: one OffsetReader per bootstrap, offsets cached per
    (bootstrap, group, topic), work-mode state per group and per usage topic."""

    def __init__(self, *, cache_s: float = 2.0, usage_topic: str = "spotbatch.usage", checkpoints=None,
                 splitter: PoolSplitter | None = None, rate_window_s: float = 600.0,
                 reader_factory: Callable[[str], object] | None = None,
                 client_options: Mapping | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache_s = cache_s
        self.splitter = splitter
        self._usage_topic = usage_topic
        self._checkpoints = checkpoints
        self._rate_window_s = rate_window_s
        # client_options (kafka_security.client_options): used for every trigger's Kafka.
        self._reader_factory = reader_factory or functools.partial(_offset_reader, client_options=client_options)
        self._clock = clock
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}
        self._readers: dict[str, object] = {}
        self._offsets: dict[tuple, _Offsets] = {}
        self._pending: dict[tuple, object] = {}
        self._rates: dict[str, object] = {}
        self.broker_reads = 0  # offset reads that went to the broker (cache misses)

    def reading(self, request: ScalerRequest, metadata: Mapping[str, str] | None = None) -> Reading:
        """The metric for ``request``. Raises LagError (bad group/topic) or
        MetadataError (a pool without a splitter)."""
        if request.pool and self.splitter is None:
            raise MetadataError(f"metadata pool={request.pool!r} needs a pool splitter, and this scaler has none; "
                                "start it with one (spotbatch scaler serve --pools) or drop pool")
        off = self._read(request)
        result = compute_lag(off.committed, off.ends, request.options, off.previous)
        if request.mode == "lag":
            metric = policy.lag_metric(result.total_lag, result.active, request.options.lag_threshold)
            pending = rate = None
        else:
            pending, rate = self._work(request, off)
            metric = policy.work_metric(pending, rows_per_s_per_replica=rate, drain_s=request.drain_s,
                                        partition_count=result.partition_count, lag_active=result.active,
                                        allow_idle_consumers=request.options.allow_idle_consumers)
        desired = math.ceil(metric.value / metric.target) if metric.active else 0
        value, active = metric.value, metric.active
        if request.pool:
            share = max(int(self.splitter.replicas(request.pool, desired, dict(metadata or {}))), 0)
            value, active = share * metric.target, share > 0
        return Reading(value=value, target=metric.target, active=active, total_lag=result.total_lag,
                       pending_rows=pending, rows_per_s=rate, desired_total=desired,
                       partitions=result.partition_count)

    def _read(self, request: ScalerRequest) -> _Offsets:
        key = (request.bootstrap, request.group, request.topic)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # concurrent callers wait for one read instead of each reading
            cached = self._offsets.get(key)
            if cached and self._clock() - cached.at < self.cache_s:
                return cached
            committed, ends = read_offsets(self._reader(request.bootstrap), request.group, request.topic)
            self.broker_reads += 1
            fresh = _Offsets(committed, ends, cached.committed if cached else None, self._clock())
            self._offsets[key] = fresh
            return fresh

    def _work(self, request: ScalerRequest, off: _Offsets) -> tuple[int, float]:
        from spotbatch.scaler.work import PendingWork, UsageRates

        reader = self._reader(request.bootstrap)
        key = (request.bootstrap, request.group, request.topic, request.options.offset_reset_policy)
        with self._lock:
            work = self._pending.setdefault(key, PendingWork(
                reader, checkpoints=self._checkpoints, offset_reset_policy=request.options.offset_reset_policy))
            rates = self._rates.setdefault(request.bootstrap, UsageRates(
                reader, self._usage_topic, window_s=self._rate_window_s))
        return work.pending(off.committed, off.ends), rates.rate(default=request.rows_per_s)

    def _reader(self, bootstrap: str):
        with self._lock:
            if bootstrap not in self._readers:
                self._readers[bootstrap] = self._reader_factory(bootstrap)
            return self._readers[bootstrap]

    def close(self) -> None:
        with self._lock:
            readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.close()


def _offset_reader(bootstrap: str, *, client_options: Mapping | None = None):
    from kafka.errors import KafkaError

    from spotbatch.kafka_admin import OffsetReader

    try:
        return OffsetReader(bootstrap, client_options=client_options)
    except KafkaError as exc:
        raise LagError(f"cannot reach Kafka at {bootstrap} ({exc}); check bootstrapServers") from None


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter("spotbatch_scaler_calls", "gRPC calls", ["method", "code"], registry=registry)
        self.latency = Histogram("spotbatch_scaler_call_seconds", "gRPC call latency", ["method"], registry=registry)
        self.value = Gauge("spotbatch_scaler_metric_value", "Last metric value served", ["metric"], registry=registry)
        self.active = Gauge("spotbatch_scaler_active", "Last activity answer (1 active)", ["metric"], registry=registry)


class ExternalScalerServicer(pb_grpc.ExternalScalerServicer):
    """KEDA's four calls over a LagSource."""

    def __init__(self, source: LagSource, *, default_bootstrap: str | None = None,
                 registry: CollectorRegistry | None = None, stream_interval_s: float = 5.0) -> None:
        self.source = source
        self._default_bootstrap = default_bootstrap
        self._metrics = _Metrics(registry or CollectorRegistry())
        self._stream_interval_s = stream_interval_s
        self._stopping = threading.Event()

    def GetMetricSpec(self, request, context):  # noqa: N802 - gRPC names
        with self._call("GetMetricSpec", context):
            req = self._parse(request.scalerMetadata, context)
            target = self._target(req, context)
            return pb.GetMetricSpecResponse(metricSpecs=[pb.MetricSpec(
                metricName=metric_name(req), targetSize=max(int(round(target)), 1), targetSizeFloat=target)])

    def GetMetrics(self, request, context):  # noqa: N802
        with self._call("GetMetrics", context):
            meta = request.scaledObjectRef.scalerMetadata
            req = self._parse(meta, context)
            name = metric_name(req)
            if request.metricName and _strip_keda_prefix(request.metricName) != name:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"unknown metric {request.metricName!r}; this trigger's metric is {name!r}")
            reading = self._reading(req, meta, context)
            self._metrics.value.labels(name).set(reading.value)
            return pb.GetMetricsResponse(metricValues=[pb.MetricValue(
                metricName=name, metricValue=int(math.ceil(reading.value)), metricValueFloat=reading.value)])

    def IsActive(self, request, context):  # noqa: N802
        with self._call("IsActive", context):
            req = self._parse(request.scalerMetadata, context)
            reading = self._reading(req, request.scalerMetadata, context)
            self._metrics.active.labels(metric_name(req)).set(int(reading.active))
            return pb.IsActiveResponse(result=reading.active)

    def StreamIsActive(self, request, context):  # noqa: N802
        """Send the activity now and on every change (KEDA's ``external-push``)."""
        req = self._parse(request.scalerMetadata, context)
        last = None
        while context.is_active() and not self._stopping.is_set():
            try:
                active = self.source.reading(req, request.scalerMetadata).active
            except (LagError, MetadataError) as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            except Exception as exc:  # noqa: BLE001 - a broker blip: keep the stream, try again
                log.warning("StreamIsActive %s: %s", metric_name(req), exc)
                active = None
            if active is not None and active != last:
                last = active
                yield pb.IsActiveResponse(result=active)
            self._stopping.wait(self._stream_interval_s)

    def stop(self) -> None:
        self._stopping.set()

    def _parse(self, meta: Mapping[str, str], context) -> ScalerRequest:
        try:
            return parse_metadata(meta, default_bootstrap=self._default_bootstrap)
        except MetadataError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _target(self, req: ScalerRequest, context) -> float:
        if req.mode == "lag":
            return float(req.options.lag_threshold)
        # work mode: the target is the learned rows/s x drainSeconds; no pool share needed
        return self._reading(replace(req, pool=None), {}, context).target

    def _reading(self, req: ScalerRequest, meta: Mapping[str, str], context) -> Reading:
        try:
            return self.source.reading(req, meta)
        except MetadataError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except LagError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:  # noqa: BLE001 - broker down or slow: KEDA retries the call
            context.abort(grpc.StatusCode.UNAVAILABLE, f"reading offsets from {req.bootstrap}: {exc}")

    def _call(self, method: str, context):
        return _Timed(self._metrics, method, context)


class _Timed:
    def __init__(self, metrics: _Metrics, method: str, context) -> None:
        self._m, self._method, self._context = metrics, method, context

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._m.latency.labels(self._method).observe(time.perf_counter() - self._t0)
        code = self._context.code() if exc_type is not None else grpc.StatusCode.OK
        self._m.calls.labels(self._method, getattr(code, "name", "UNKNOWN")).inc()
        return False


@dataclass
class ScalerServer:
    """A running scaler: gRPC (+ health) and, if asked, HTTP /metrics + /healthz."""

    grpc_server: grpc.Server
    port: int
    servicer: ExternalScalerServicer
    health: health.HealthServicer
    http: object | None = None
    metrics_port: int | None = None

    def stop(self, grace_s: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()  # probes see NOT_SERVING while calls finish
        self.servicer.stop()
        self.grpc_server.stop(grace_s).wait()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        self.servicer.source.close()


def serve(*, port: int = 9090, metrics_port: int | None = 9091, host: str = "0.0.0.0",
          source: LagSource | None = None, default_bootstrap: str | None = None,
          max_workers: int = 64, stream_interval_s: float = 5.0) -> ScalerServer:
    """Start the scaler (port 0: a free one); returns once it is serving."""
    registry = CollectorRegistry()
    servicer = ExternalScalerServicer(source or LagSource(), default_bootstrap=default_bootstrap,
                                      registry=registry, stream_interval_s=stream_interval_s)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="scaler"))
    pb_grpc.add_ExternalScalerServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}; pick a free --port")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    http = _serve_http(host, metrics_port, registry) if metrics_port is not None else None
    return ScalerServer(server, bound, servicer, health_servicer, http,
                        http.server_port if http is not None else None)


def _serve_http(host: str, port: int, registry: CollectorRegistry):
    """/metrics (Prometheus) and /healthz on a daemon thread."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/metrics":
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # scrapes are not worth a log line each
            pass

    httpd = make_server(host, port, app, server_class=Server, handler_class=QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="scaler-http", daemon=True).start()
    return httpd
