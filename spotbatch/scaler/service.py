"""The KEDA external scaler: a gRPC ``externalscaler.ExternalScaler`` over our lag.

KEDA passes the trigger's metadata on every call; we parse it (``parse_metadata``),
read the group's offsets (cached per (bootstrap, group, topic) for ``cache_s``, so 50
concurrent polls cost one broker round trip), and answer:

- GetMetricSpec: one metric, ``spotbatch-<mode>-<topic or group>[-<pool>]``, target
  lagThreshold (lag mode) or rows/s per replica x drainSeconds (work mode);
- GetMetrics: the metric value (float and the deprecated int); the HPA then wants
  ceil(value / target) replicas;
- IsActive / StreamIsActive: KEDA's activation (the stream sends each change).

Triggers are isolated from each other: a Kafka that does not answer holds no lock or
thread another trigger needs; a trigger's call waits at most ``call_timeout_s`` (then its
last answer, or UNAVAILABLE). Malformed ``bootstrapServers`` is INVALID_ARGUMENT; with
``allowed_bootstrap``, naming another server is PERMISSION_DENIED.

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
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, NoReturn, Protocol, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spotbatch.scaler import policy
from spotbatch.scaler.lag import LagError, LagOptions, compute_lag, read_offsets
from spotbatch.scaler.proto import externalscaler_pb2 as pb
from spotbatch.scaler.proto import externalscaler_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from spotbatch.scaler.work import PendingWork, UsageRates

__all__ = [
    "PoolSplitter",
    "MetadataError",
    "ScalerRequest",
    "Reading",
    "LagSource",
    "Unavailable",
    "bootstrap_servers",
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


class OffsetSource(Protocol):
    """What ``reader_factory`` makes: a kafka_admin.OffsetReader, or a stand-in for one."""

    def close(self) -> None: ...


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
    bootstrap = ",".join(bootstrap_servers(bootstrap))
    group = meta.get("consumerGroup")
    if not group:
        raise MetadataError("metadata consumerGroup is missing; set it to the workers' consumer group")
    raw_mode = meta.get("mode", "lag")
    if raw_mode not in ("lag", "work"):
        raise MetadataError(f"metadata mode={_echo(raw_mode)} is not lag or work; use mode: lag (KEDA's lag) or mode: work")
    mode = cast(Literal["lag", "work"], raw_mode)
    pool = meta.get("pool") or None
    if pool is not None and pool not in POOLS:
        raise MetadataError(f"metadata pool={_echo(pool)} is not one of {', '.join(POOLS)}")
    opts: dict = {k: _int(meta, key) for key, k in _INT_KEYS.items() if key in meta}
    opts.update({k: _bool(meta, key) for key, k in _BOOL_KEYS.items() if key in meta})
    if "offsetResetPolicy" in meta:
        opts["offset_reset_policy"] = meta["offsetResetPolicy"][:MAX_ECHO]
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
        raise MetadataError(f"metadata {key}={_echo(meta[key])} is not an integer; give a whole number") from None


def _bool(meta: Mapping[str, str], key: str) -> bool:
    value = _BOOL.get(meta[key].strip().lower())
    if value is None:
        raise MetadataError(f"metadata {key}={_echo(meta[key])} is not a boolean; use \"true\" or \"false\"")
    return value


def _positive(meta: Mapping[str, str], key: str, default: float) -> float:
    if key not in meta:
        return default
    try:
        value = float(meta[key])
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise MetadataError(f"metadata {key}={_echo(meta[key])} must be a number > 0")
    return value


MAX_ECHO = 200  # characters of a metadata value echoed in an error message
_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\]")
_PORT = re.compile(r"[0-9]{1,5}")


def _clip(value: object, limit: int = MAX_ECHO) -> str:
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _echo(value: object) -> str:
    """A metadata value for an error message: quoted, at most MAX_ECHO characters."""
    return repr(_clip(value))


def _one_line(message: str, limit: int = 4 * MAX_ECHO) -> str:
    return _clip(" ".join(message.split()), limit)


def bootstrap_servers(value: str) -> list[str]:
    """``host:port[,host:port]`` (an optional ``PROTOCOL://`` each, as kafka-python takes)
    as its entries; MetadataError if one is not host:port with a port in 1..65535."""
    entries = [entry.strip() for entry in value.split(",")]
    for entry in entries:
        host, sep, port = re.sub(r"^[A-Za-z_]+://", "", entry).rpartition(":")
        if not (sep and _HOST.fullmatch(host) and _PORT.fullmatch(port) and 0 < int(port) < 65536):
            raise MetadataError(f"metadata bootstrapServers={_echo(value)} is not host:port[,host:port] "
                                f"(entry {_echo(entry)}); set it to the Kafka bootstrap, e.g. kafka:9092")
    return entries


def _bootstrap_hosts(bootstrap: str) -> set[str]:
    return {re.sub(r"^[A-Za-z_]+://", "", entry).lower() for entry in bootstrap_servers(bootstrap)}


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


class Unavailable(RuntimeError):
    """A trigger's Kafka did not answer (in time): gRPC UNAVAILABLE for that trigger."""


@dataclass
class _Group:
    """Per (bootstrap, group, topic): concurrent callers wait for one read."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    offsets: _Offsets | None = None


@dataclass
class _Cluster:
    """Per bootstrap: its OffsetReader (made under this cluster's own lock, so a Kafka
    that does not answer blocks only its own triggers) and its usage rates."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: OffsetSource | None = None
    rates: UsageRates | None = None
    closed: bool = False


DEFAULT_CALL_TIMEOUT_S = 3.0
DEFAULT_STALE_S = 300.0


class LagSource:
    """Readings for requests: one OffsetReader per bootstrap, offsets cached per
    (bootstrap, group, topic), work-mode state per group and per usage topic.

    Isolation between triggers: nothing held across a broker call is shared by two
    clusters. Each trigger's reading runs on its own thread (one in flight per trigger)
    and a caller waits at most ``call_timeout_s`` for it; then it gets the trigger's last
    answer (if younger than ``stale_s``) or ``Unavailable``. Idle state is evicted
    least-recently-used first: at most ``max_groups`` groups/triggers and
    ``max_clusters`` bootstraps (an evicted cluster's reader is closed)."""

    def __init__(self, *, cache_s: float = 2.0, usage_topic: str = "spotbatch.usage", checkpoints=None,
                 splitter: PoolSplitter | None = None, rate_window_s: float = 600.0,
                 reader_factory: Callable[[str], OffsetSource] | None = None,
                 client_options: Mapping | None = None,
                 call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S, stale_s: float = DEFAULT_STALE_S,
                 max_groups: int = 1024, max_clusters: int = 64, input_prefixes: Sequence[str] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        if call_timeout_s is not None and not call_timeout_s > 0:
            raise ValueError(f"call_timeout_s must be > 0 (or None), got {call_timeout_s}")
        if max_groups < 1 or max_clusters < 1:
            raise ValueError("max_groups and max_clusters must be >= 1")
        self.cache_s = cache_s
        self.splitter = splitter
        self.call_timeout_s = call_timeout_s
        self.stale_s = stale_s
        self.max_groups = max_groups
        self.max_clusters = max_clusters
        self._usage_topic = usage_topic
        self._checkpoints = checkpoints
        self._input_prefixes = tuple(input_prefixes)  # work mode counts URI jobs only where workers read
        self._rate_window_s = rate_window_s
        # client_options (kafka_security.client_options): used for every trigger's Kafka.
        self._reader_factory = reader_factory or functools.partial(_offset_reader, client_options=client_options)
        self._clock = clock
        self._lock = threading.Lock()  # guards the dicts below only; never held across I/O
        self._groups: OrderedDict[tuple, _Group] = OrderedDict()
        self._clusters: OrderedDict[str, _Cluster] = OrderedDict()
        self._pending: OrderedDict[tuple, PendingWork] = OrderedDict()
        self._answers: OrderedDict[tuple, tuple[Reading, float]] = OrderedDict()  # trigger -> (last, at)
        self._inflight: dict[tuple, futures.Future] = {}
        self.broker_reads = 0  # offset reads that went to the broker (cache misses)
        self.stale_answers = 0  # calls answered with a trigger's last reading (its Kafka failed or was slow)

    def reading(self, request: ScalerRequest, metadata: Mapping[str, str] | None = None) -> Reading:
        """The metric for ``request``. Raises LagError (bad group/topic), MetadataError
        (a pool without a splitter) or Unavailable (Kafka down or slower than
        ``call_timeout_s``, and no recent answer for this trigger)."""
        if request.pool and self.splitter is None:
            raise MetadataError(f"metadata pool={request.pool!r} needs a pool splitter, and this scaler has none; "
                                "start it with one (spotbatch scaler serve --pools) or drop pool")
        meta = dict(metadata or {})
        key = (request, tuple(sorted(meta.items())))
        with self._lock:
            future = self._inflight.get(key)
            if future is None:
                future = self._inflight[key] = futures.Future()
                threading.Thread(target=self._run, args=(key, future, request, meta), daemon=True,
                                 name="scaler-read").start()
        try:
            return future.result(timeout=self.call_timeout_s)
        except futures.TimeoutError:
            return self._fallback(key, Unavailable(
                f"no answer from Kafka at {_clip(request.bootstrap)} within {self.call_timeout_s:g}s; "
                "check bootstrapServers and that the brokers are up"))
        except (LagError, MetadataError):
            raise
        except Exception as exc:  # noqa: BLE001 - broker down or failing: this trigger only
            return self._fallback(key, exc if isinstance(exc, Unavailable) else Unavailable(
                f"reading offsets from {_clip(request.bootstrap)}: {exc}"))

    def _run(self, key: tuple, future: futures.Future, request: ScalerRequest, meta: dict) -> None:
        try:
            result = self._reading_now(request, meta)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            future.set_exception(exc)
        else:
            with self._lock:
                self._answers[key] = (result, self._clock())
                self._answers.move_to_end(key)
                while len(self._answers) > self.max_groups:
                    self._answers.popitem(last=False)
            future.set_result(result)
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _fallback(self, key: tuple, exc: Exception) -> Reading:
        with self._lock:
            last = self._answers.get(key)
        if last is not None and self._clock() - last[1] <= self.stale_s:
            self.stale_answers += 1
            log.warning("%s; serving this trigger's last answer (%.0fs old)", exc, self._clock() - last[1])
            return last[0]
        raise exc

    def _reading_now(self, request: ScalerRequest, metadata: Mapping[str, str]) -> Reading:
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
            if self.splitter is None:  # reading() refuses such a request before it gets here
                raise MetadataError(f"metadata pool={request.pool!r} needs a pool splitter, and this scaler has none")
            share = max(int(self.splitter.replicas(request.pool, desired, dict(metadata or {}))), 0)
            value, active = share * metric.target, share > 0
        return Reading(value=value, target=metric.target, active=active, total_lag=result.total_lag,
                       pending_rows=pending, rows_per_s=rate, desired_total=desired,
                       partitions=result.partition_count)

    def _read(self, request: ScalerRequest) -> _Offsets:
        key = (request.bootstrap, request.group, request.topic)
        with self._lock:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group()
            self._groups.move_to_end(key)
            while len(self._groups) > self.max_groups:
                self._groups.popitem(last=False)
        with group.lock:  # concurrent callers wait for one read instead of each reading
            cached = group.offsets
            if cached and self._clock() - cached.at < self.cache_s:
                return cached
            committed, ends = read_offsets(self._reader(request.bootstrap), request.group, request.topic)
            self.broker_reads += 1
            group.offsets = _Offsets(committed, ends, cached.committed if cached else None, self._clock())
            return group.offsets

    def _work(self, request: ScalerRequest, off: _Offsets) -> tuple[int, float]:
        from spotbatch.scaler.work import PendingWork, RowCounter, UsageRates

        reader = self._reader(request.bootstrap)
        key = (request.bootstrap, request.group, request.topic, request.options.offset_reset_policy)
        with self._lock:
            work = self._pending.get(key)
            if work is None:
                work = self._pending[key] = PendingWork(
                    reader, counter=RowCounter(input_prefixes=self._input_prefixes), checkpoints=self._checkpoints,
                    offset_reset_policy=request.options.offset_reset_policy)
            self._pending.move_to_end(key)
            while len(self._pending) > self.max_groups:
                self._pending.popitem(last=False)
            cluster = self._cluster(request.bootstrap)
            if cluster.rates is None:
                cluster.rates = UsageRates(reader, self._usage_topic, window_s=self._rate_window_s)
            rates = cluster.rates
        return work.pending(off.committed, off.ends), rates.rate(default=request.rows_per_s)

    def _cluster(self, bootstrap: str) -> _Cluster:
        """The cluster's state, most recently used; call with self._lock held."""
        cluster = self._clusters.get(bootstrap)
        if cluster is None:
            cluster = self._clusters[bootstrap] = _Cluster()
        self._clusters.move_to_end(bootstrap)
        while len(self._clusters) > self.max_clusters:
            old_bootstrap, old = self._clusters.popitem(last=False)
            for key in [k for k in self._pending if k[0] == old_bootstrap]:
                del self._pending[key]  # PendingWork holds the reader we are closing
            _close_later(old)
        return cluster

    def _reader(self, bootstrap: str) -> OffsetSource:
        with self._lock:
            cluster = self._cluster(bootstrap)
        with cluster.lock:  # this cluster's only: a Kafka that hangs here holds no one else
            if cluster.closed:
                raise Unavailable(f"Kafka at {_clip(bootstrap)} was evicted while in use; the next call reconnects")
            if cluster.reader is None:
                cluster.reader = self._reader_factory(bootstrap)
            return cluster.reader

    def close(self) -> None:
        with self._lock:
            clusters, self._clusters = list(self._clusters.values()), OrderedDict()
            self._pending.clear()
        for cluster in clusters:
            cluster.closed = True
            if cluster.lock.acquire(timeout=1.0):  # a reader still being made (hung Kafka): left to its thread
                try:
                    reader, cluster.reader = cluster.reader, None
                finally:
                    cluster.lock.release()
                if reader is not None:
                    reader.close()


def _close_later(cluster: _Cluster) -> None:
    """Close an evicted cluster's reader off the caller's thread (it may be mid-read)."""
    def close() -> None:
        with cluster.lock:
            cluster.closed = True
            reader, cluster.reader = cluster.reader, None
        if reader is not None:
            try:
                reader.close()
            except Exception as exc:  # noqa: BLE001 - best effort
                log.debug("closing an evicted reader: %s", exc)

    threading.Thread(target=close, daemon=True, name="scaler-evict").start()


def _offset_reader(bootstrap: str, *, client_options: Mapping | None = None):
    from kafka.errors import KafkaError

    from spotbatch.kafka_admin import OffsetReader

    try:
        return OffsetReader(bootstrap, client_options=client_options)
    except KafkaError as exc:
        raise Unavailable(f"cannot reach Kafka at {_clip(bootstrap)} ({exc}); check bootstrapServers") from None


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter("spotbatch_scaler_calls", "gRPC calls", ["method", "code"], registry=registry)
        self.latency = Histogram("spotbatch_scaler_call_seconds", "gRPC call latency", ["method"], registry=registry)
        self.value = Gauge("spotbatch_scaler_metric_value", "Last metric value served", ["metric"], registry=registry)
        self.active = Gauge("spotbatch_scaler_active", "Last activity answer (1 active)", ["metric"], registry=registry)


class ExternalScalerServicer(pb_grpc.ExternalScalerServicer):
    """KEDA's four calls over a LagSource."""

    def __init__(self, source: LagSource, *, default_bootstrap: str | None = None,
                 registry: CollectorRegistry | None = None, stream_interval_s: float = 5.0,
                 allowed_bootstrap: Iterable[str] | None = None) -> None:
        self.source = source
        self._default_bootstrap = default_bootstrap
        # host:port entries a trigger may name (None: any); the default bootstrap is always allowed
        self._allowed: set[str] | None = None
        if allowed_bootstrap is not None:
            self._allowed = {host for value in allowed_bootstrap for host in _bootstrap_hosts(value)}
            if default_bootstrap:
                self._allowed |= _bootstrap_hosts(default_bootstrap)
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
                _abort(context, grpc.StatusCode.NOT_FOUND,
                       f"unknown metric {_echo(request.metricName)}; this trigger's metric is {_echo(name)}")
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
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
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
            req = parse_metadata(meta, default_bootstrap=self._default_bootstrap)
        except MetadataError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self._allowed is not None:
            denied = sorted(_bootstrap_hosts(req.bootstrap) - self._allowed)
            if denied:
                _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                       f"metadata bootstrapServers names {_echo(','.join(denied))}, which this scaler may not "
                       "contact; use an allowed bootstrap (spotbatch scaler serve --allowed-bootstrap)")
        return req

    def _target(self, req: ScalerRequest, context) -> float:
        if req.mode == "lag":
            return float(req.options.lag_threshold)
        # work mode: the target is the learned rows/s x drainSeconds; no pool share needed
        return self._reading(replace(req, pool=None), {}, context).target

    def _reading(self, req: ScalerRequest, meta: Mapping[str, str], context) -> Reading:
        try:
            return self.source.reading(req, meta)
        except (MetadataError, LagError) as exc:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Unavailable as exc:  # this trigger's Kafka down or slow: KEDA retries the call
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        except Exception as exc:  # noqa: BLE001
            _abort(context, grpc.StatusCode.UNAVAILABLE, f"reading offsets from {_clip(req.bootstrap)}: {exc}")

    def _call(self, method: str, context):
        return _Timed(self._metrics, method, context)


def _abort(context, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` and a one-line, bounded message."""
    context.abort(code, _one_line(message))
    raise RuntimeError("grpc's context.abort returned; it always raises")  # grpc documents that it raises


class _Timed:
    def __init__(self, metrics: _Metrics, method: str, context) -> None:
        self._m, self._method, self._context = metrics, method, context

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
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
    http: WSGIServer | None = None
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
          max_workers: int = 64, stream_interval_s: float = 5.0,
          allowed_bootstrap: Iterable[str] | None = None) -> ScalerServer:
    """Start the scaler (port 0: a free one); returns once it is serving.

    ``allowed_bootstrap``: host:port entries triggers may name (None: any)."""
    registry = CollectorRegistry()
    servicer = ExternalScalerServicer(source or LagSource(), default_bootstrap=default_bootstrap,
                                      registry=registry, stream_interval_s=stream_interval_s,
                                      allowed_bootstrap=allowed_bootstrap)
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


def _serve_http(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """/metrics (Prometheus) and /healthz (always ok while serving) on a daemon thread."""
    from spotbatch.metrics_http import serve_http

    return serve_http(port, registry, host=host, name="scaler-http")
