"""Prometheus metrics and the ``/metrics`` + ``/healthz`` endpoint of a worker."""

from __future__ import annotations

import time
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spotbatch.metrics_http import Health, serve_http

__all__ = ["WorkerMetrics", "serve_metrics"]

_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rows = Counter("spotbatch_rows", "Rows inferred", registry=r)
        self.parts = Counter("spotbatch_parts", "Parts of URI jobs made durable and checkpointed", registry=r)
        self.part_rows = Gauge("spotbatch_checkpoint_part_rows", "Rows per checkpointed part of the latest URI job",
                               registry=r)
        self.rows_lost = Counter("spotbatch_rows_lost", "Inferred rows abandoned by a stop before durable", registry=r)
        self.jobs = Counter("spotbatch_jobs", "Jobs finished, by status", ["status"], registry=r)
        self.errors = Counter("spotbatch_job_errors", "Dead-lettered or failed jobs, by code", ["code"], registry=r)
        self.batch_rows = Histogram("spotbatch_batch_rows", "Rows per model call", buckets=_ROW_BUCKETS, registry=r)
        self.batch_seconds = Histogram("spotbatch_batch_seconds", "Seconds per model call", registry=r)
        self.lag = Gauge("spotbatch_lag_records", "High watermark minus committable offset", ["partition"], registry=r)
        self.pending_rows = Gauge("spotbatch_pending_rows", "Rows accepted and not yet inferred", registry=r)
        self.last_loop = Gauge("spotbatch_last_loop_timestamp_seconds", "When the consumer loop last turned", registry=r)

        self._last_loop_at = time.time()

    def tick(self) -> None:
        self._last_loop_at = time.time()
        self.last_loop.set(self._last_loop_at)

    def healthy(self, stale_s: float = 30.0) -> bool:
        """The owner thread turned its loop recently (it polls at least every ~200 ms)."""
        return time.time() - self._last_loop_at < stale_s


def serve_metrics(port: int, registry: Any, healthy: Health) -> WSGIServer:
    """Start the daemon /metrics + /healthz server on ``port`` (spotbatch.metrics_http);
    returns it so the caller can shut it down. ``healthy`` returns a bool, or (ok,
    reason): the reason is the /healthz body. ``registry`` is anything with
    ``collect()`` (a stand-in while the worker starts)."""
    return serve_http(port, registry, healthy, name="metrics-http")
