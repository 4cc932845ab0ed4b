"""The worker process: build it from settings and run it until drained or signalled."""

from __future__ import annotations

import logging
import signal

import torch

from spotbatch.config import Settings
from spotbatch.models import get_handler
from spotbatch.models.runner import BatchRunner
from spotbatch.workers.metrics import serve_metrics
from spotbatch.workers.sinks import ParquetSink
from spotbatch.workers.worker import Worker, WorkerStats

__all__ = ["Worker", "WorkerStats", "build_worker", "run_worker"]

log = logging.getLogger("spotbatch.worker")


def build_worker(settings: Settings, *, burst: bool = False) -> Worker:
    """Load the model first: a worker joins the group only once it can infer."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    handler = get_handler(settings.model)
    runner = BatchRunner(handler, device=settings.device, precision=settings.precision)
    runner.load()
    log.info("model %s loaded on %s", handler.name, runner.device)
    return Worker(settings, handler, runner.run, ParquetSink(settings.output), burst=burst)


def run_worker(settings: Settings, *, burst: bool = False) -> WorkerStats:
    """Run with SIGTERM/SIGINT draining; a second signal abandons in-flight work."""
    worker = build_worker(settings, burst=burst)
    signals = {"count": 0}

    def on_signal(signum, _frame) -> None:
        signals["count"] += 1
        log.info("%s: draining (%s)", signal.Signals(signum).name, "now" if signals["count"] > 1 else "graceful")
        worker.request_stop(now=signals["count"] > 1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = None
    if settings.metrics_port:
        server = serve_metrics(settings.metrics_port, worker.metrics.registry, worker.metrics.healthy)
        log.info("metrics on :%d/metrics and /healthz", settings.metrics_port)
    try:
        return worker.run()
    finally:
        if server:
            server.shutdown()
