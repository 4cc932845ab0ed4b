"""The PoolSplitter the external scaler injects: a pool's share of the desired replicas.

The scaler asks once per ScaledObject per poll (spot and on-demand, each with its own
trigger metadata, both carrying the same pool keys that ``apply`` writes). Both
questions about one workload (consumer group + topic) share one ``FallbackMemory``, so
the two HPAs land on the two halves of one decision.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping, Protocol

from spotbatch.scheduler.pools import FallbackMemory, PoolObservation, config_from_metadata, decide

__all__ = ["PoolStateSource", "HybridSplitter", "live_splitter"]

log = logging.getLogger(__name__)


class PoolStateSource(Protocol):
    def observe(self) -> PoolObservation: ...


class HybridSplitter:
    """Implements spotbatch.scaler.service.PoolSplitter with pools.decide."""

    def __init__(self, state_for: Callable[[Mapping[str, str]], PoolStateSource], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._state_for = state_for  # trigger metadata -> its pool state (e.g. one per Kafka)
        self._clock = clock
        self._memory: dict[tuple[str, str], FallbackMemory] = {}
        self._lock = threading.Lock()

    def replicas(self, pool: str, desired_total: int, metadata: Mapping[str, str]) -> int:
        config = config_from_metadata(metadata)  # ValueError names the bad key
        observed = self._state_for(metadata).observe()
        key = (metadata.get("consumerGroup", ""), metadata.get("topic", ""))
        with self._lock:
            before = self._memory.get(key, FallbackMemory())
            split, after = decide(desired_total, observed, self._clock(), config, before)
            self._memory[key] = after
        if after.active != before.active:
            log.warning("pool split for %s/%s: %s (on-demand %d, spot %d, fallback %d)", key[0], key[1],
                        split.reason, split.on_demand, split.spot, split.fallback)
        return split.for_pool(pool)


def live_splitter(*, usage_topic: str, default_bootstrap: str | None, namespace: str = "spotbatch",
                  kubeconfig: str | None = None, context: str | None = None,
                  rate_window_s: float = 3600.0, state_cache_s: float = 2.0,
                  client_options: Mapping | None = None) -> HybridSplitter:
    """The splitter `spotbatch scaler serve --pools` runs: spot readiness from the
    Kubernetes API, interruption rates from the usage topic of each trigger's Kafka."""
    from spotbatch.kafka_admin import OffsetReader
    from spotbatch.scheduler.pool_state import InterruptionRates, KubeDeployments, LivePoolState

    deployments = KubeDeployments(namespace=namespace, kubeconfig=kubeconfig, context=context)
    states: dict[str, LivePoolState] = {}
    lock = threading.Lock()

    def state_for(metadata: Mapping[str, str]) -> LivePoolState:
        bootstrap = metadata.get("bootstrapServers") or default_bootstrap or ""
        with lock:
            if bootstrap not in states:
                rates = InterruptionRates(OffsetReader(bootstrap, client_options=client_options), usage_topic, window_s=rate_window_s) if bootstrap else None
                states[bootstrap] = LivePoolState(deployments, rates.rate if rates else None, cache_s=state_cache_s)
            return states[bootstrap]

    return HybridSplitter(state_for)
