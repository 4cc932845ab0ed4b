"""What the live scaler observes about the spot pool, for the pool policy.

- Readiness: the spot Deployment's spec.replicas (what its HPA asked for) and
  status.readyReplicas, through ``DeploymentReader`` (one method). ``KubeDeployments``
  is the real one, on the official ``kubernetes`` client (the scaler's Role may get
  deployments in its namespace: k8s/base/rbac.yaml).
- Interruptions per spot replica-hour: usage records (kind "usage", pool "spot") whose
  interval ends within the window: sum(interruptions) / sum(seconds_alive) x 3600.
  Records are keyed by record_id, so a redelivered one counts once.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Mapping, Protocol, Union

from spotbatch.records import UsageRecord, usage_or_none
from spotbatch.scheduler.pools import PoolObservation
from spotbatch.usage_tail import UsageTail

__all__ = ["DeploymentReader", "KubeDeployments", "interruption_rate_per_h", "InterruptionRates", "LivePoolState",
           "SPOT_DEPLOYMENT"]

SPOT_DEPLOYMENT = "spotbatch-worker-spot"
_MIN_ALIVE_H = 1.0  # below one replica-hour of evidence a single interruption is noise, not a rate


class DeploymentReader(Protocol):
    def replicas(self, name: str) -> tuple[int, int]:
        """(replicas requested, replicas ready) of a Deployment."""
        ...


class KubeDeployments:
    def __init__(self, *, namespace: str = "spotbatch", kubeconfig: str | None = None, context: str | None = None) -> None:
        from kubernetes import client, config

        from spotbatch.config import Environment

        if kubeconfig is None and context is None and Environment().kubernetes_service_host:
            config.load_incluster_config()
            api_client = client.ApiClient()
        else:
            api_client = config.new_client_from_config(config_file=kubeconfig, context=context, persist_config=False)
        self._api = client.AppsV1Api(api_client)
        self._namespace = namespace

    def replicas(self, name: str) -> tuple[int, int]:
        dep = self._api.read_namespaced_deployment(name=name, namespace=self._namespace)
        return int(dep.spec.replicas or 0), int((dep.status and dep.status.ready_replicas) or 0)


def interruption_rate_per_h(records: Iterable[Union[UsageRecord, Mapping[str, Any]]], *, now_s: float,
                            window_s: float, pool: str = "spot") -> float:
    """Interruptions per replica-hour of ``pool`` over the window ending ``now_s``
    (epoch seconds). 0 with less than an hour of replica time to judge by. Records are
    UsageRecords or their wire dicts; anything else (other kinds) is skipped."""
    seen: set[str] = set()
    interruptions, alive_s = 0, 0.0
    for item in records:
        rec = item if isinstance(item, UsageRecord) else usage_or_none(item)
        if rec is None or rec.pool != pool or rec.record_id in seen or not now_s - window_s < rec.end <= now_s:
            continue
        seen.add(rec.record_id)
        interruptions += rec.interruptions
        alive_s += rec.seconds_alive
    alive_h = alive_s / 3600
    return interruptions / alive_h if alive_h >= _MIN_ALIVE_H else 0.0


class InterruptionRates:
    """Reads new usage records on each call (kafka_admin.OffsetReader, no group) and
    keeps the window's spot records."""

    def __init__(self, reader, topic: str, *, window_s: float = 3600.0,
                 clock: Callable[[], float] = time.time, max_records: int = 100_000) -> None:
        self._tail = UsageTail(reader, topic, parse=_spot_usage, record_id=lambda r: r.record_id,
                               end=lambda r: r.end, window_s=window_s, clock=clock, max_items=max_records)
        self._window_s = window_s
        self._clock = clock

    def rate(self) -> float:
        return interruption_rate_per_h(self._tail.items(), now_s=self._clock(), window_s=self._window_s)


def _spot_usage(value: bytes | None) -> UsageRecord | None:
    rec = usage_or_none(value)  # unreadable records and other kinds are not ours
    return rec if rec is not None and rec.pool == "spot" else None


class LivePoolState:
    """``observe()`` -> PoolObservation, cached for ``cache_s`` (the scaler asks for both
    pools' shares and IsActive on every poll)."""

    def __init__(self, deployments: DeploymentReader, rates: Callable[[], float] | None = None, *,
                 spot_deployment: str = SPOT_DEPLOYMENT, cache_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._deployments = deployments
        self._rates = rates
        self._name = spot_deployment
        self._cache_s = cache_s
        self._clock = clock
        self._cached: tuple[float, PoolObservation] | None = None
        self._lock = threading.Lock()

    def observe(self) -> PoolObservation:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] >= self._cache_s:
                requested, ready = self._deployments.replicas(self._name)
                rate = self._rates() if self._rates else 0.0
                self._cached = (now, PoolObservation(spot_requested=requested, spot_ready=ready,
                                                     interruption_rate_per_h=rate))
            return self._cached[1]
