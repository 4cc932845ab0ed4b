"""The worker process: build it from settings and run it until drained or signalled."""

from __future__ import annotations

import logging
import time

import torch

from spotbatch.config import Settings
from spotbatch.workers.broker import Broker
from spotbatch.workers.metrics import serve_metrics
from spotbatch.workers.preemption import Notice, watchers_for
from spotbatch.workers.serving import serve
from spotbatch.workers.sinks import ParquetSink
from spotbatch.workers.startup import (BOOTSTRAP_ERRORS, EXIT_BROKER, BrokerWatch, StartupError, StartupHealth,
                                      broker_unreachable, check_locations, wait_for_broker)
from spotbatch.workers.worker import Worker, WorkerStats

__all__ = ["Worker", "WorkerStats", "StartupError", "build_worker", "run_worker"]

log = logging.getLogger("spotbatch.worker")


def build_worker(settings: Settings, *, burst: bool = False, broker: Broker | None = None) -> Worker:
    """Load the model first: a worker joins the group only once it can infer.
    ``broker``: Kafka by default; ``spotbatch.testing.MemoryBroker`` in unit tests."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    versions = serve(settings)
    return Worker(settings, versions.handler, None, ParquetSink(settings.output), burst=burst, broker=broker,
                  versions=versions)


def run_worker(settings: Settings, *, burst: bool = False) -> WorkerStats:
    """Run until drained: a spot notice or SIGTERM drains within its deadline; a second
    signal abandons in-flight work at once (it is redelivered, never lost).

    Before the model loads: /healthz answers (503 with the phase), the output and
    checkpoint locations take a probe write, and Kafka must answer within
    ``broker_wait_s``; each failure is a StartupError (one line, an exit status)."""
    health = StartupHealth()
    server = None
    if settings.metrics_port:
        try:
            server = serve_metrics(settings.metrics_port, health, health.status)
        except OSError as exc:  # port taken, or not ours to bind
            raise StartupError(f"cannot serve /metrics and /healthz on port {settings.metrics_port} ({exc}); pass a "
                               "free --metrics-port (env SPOTBATCH_METRICS_PORT), or 0 for none", 2) from None
        log.info("metrics on :%d/metrics and /healthz", settings.metrics_port)
    watchers: list = []
    watch = None
    try:
        health.set_phase("starting: checking output")
        check_locations(settings)
        health.set_phase("starting: connecting to Kafka")
        waited = time.monotonic()
        wait_for_broker(settings, on_unreachable=lambda: health.set_phase("broker unreachable"))
        health.set_phase("starting: loading model")
        try:
            worker = build_worker(settings, burst=burst)
        except BOOTSTRAP_ERRORS as exc:  # the broker went away during the model load
            raise broker_unreachable(settings, time.monotonic() - waited, exc) from None
        watch = BrokerWatch(settings, worker).start()
        health.attach(worker, watch)
        watchers = watchers_for(settings.notice_source, aws_url=settings.aws_metadata_url,
                                gcp_url=settings.gcp_metadata_url, azure_url=settings.azure_metadata_url,
                                interval_s=settings.notice_poll_s)

        def on_notice(notice: Notice) -> None:
            if notice.kind == "rebalance":  # advisory: checkpoint often, start no large job for a while
                log.warning("spot rebalance recommendation (%s): checkpointing every batch, holding new large jobs "
                            "for %.0fs", notice.source, settings.rebalance_hold_s)
                worker.avoid_large_jobs(settings.rebalance_hold_s)
                return
            again = notice.detail.endswith("(again)")
            log.warning("%s notice from %s (%s): draining%s", notice.kind, notice.source, notice.detail,
                        " now" if again else "")
            worker.request_stop(now=again, within_s=notice.deadline_s, reason=f"{notice.source}: {notice.detail}")

        for watcher in watchers:
            watcher.start(on_notice)
        try:
            stats = worker.run()
        except Exception:
            if watch.lost_s is not None:  # the fault was the lost broker: say so in one line
                raise StartupError(watch.message(), EXIT_BROKER) from None
            raise
        if watch.lost_s is not None:
            raise StartupError(watch.message(), EXIT_BROKER)
        return stats
    finally:
        if watch is not None:
            watch.stop()
        for watcher in watchers:  # after the drain: Azure's acknowledgement ends our window
            watcher.stop()
        if server:
            server.shutdown()
