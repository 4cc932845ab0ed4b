"""Prometheus metrics and the ``/metrics`` + ``/healthz`` endpoint of a worker."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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


def serve_metrics(port: int, registry: CollectorRegistry, healthy: Callable[[], bool | tuple[bool, str]]
                  ) -> ThreadingHTTPServer:
    """Start a daemon HTTP server on ``port``; returns it so the caller can shut it down.

    ``healthy`` returns a bool, or (ok, reason): the reason is the /healthz body.
    ``registry`` is anything with ``collect()`` (a stand-in while the worker starts).
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            if self.path.startswith("/metrics"):
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif self.path.startswith("/healthz"):
                result = healthy()
                ok, reason = result if isinstance(result, tuple) else (result, "ok" if result else "stalled")
                self._reply(200 if ok else 503, f"{reason}\n".encode(), "text/plain")
            else:
                self._reply(404, b"not found: try /metrics or /healthz\n", "text/plain")

        def _reply(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes are not worth a log line each
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
