"""Checks a worker makes before it loads its model, and /healthz while it starts.

Order (``spotbatch worker``): serve /metrics + /healthz, check that the output and the
checkpoint location take a probe write, wait (at most ``broker_wait_s``) for Kafka,
then load the model and join the group. Each failure is a :class:`StartupError`: one
line that names the location and the fix, and the exit status to leave with.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any, Callable

import kafka.errors as _kafka_errors

from spotbatch.config import Settings

__all__ = ["StartupError", "StartupHealth", "check_writable", "check_locations", "wait_for_broker",
           "broker_unreachable", "BrokerWatch", "BOOTSTRAP_ERRORS", "EXIT_BROKER", "EXIT_LOCATION", "PROBE_PREFIX"]

log = logging.getLogger("spotbatch.worker")

PROBE_PREFIX = ".spotbatch-probe-"  # the write check's file or object, deleted at once
EXIT_LOCATION = 2  # the operator's to fix: like a bad flag
EXIT_BROKER = 1  # infrastructure: like any fatal fault of a running worker

# What a KafkaConsumer/KafkaProducer constructor raises when no bootstrap server answers
# (kafka-python 3: KafkaTimeoutError; 2.x: NoBrokersAvailable).
BOOTSTRAP_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(_kafka_errors, "KafkaTimeoutError", None), getattr(_kafka_errors, "NoBrokersAvailable", None))
    if e is not None)

# One bootstrap try: the first is short so /healthz says "broker unreachable" soon; the
# later ones leave room for a slow TLS/SASL handshake. Reconnect backoff is at most 1 s.
_FIRST_ATTEMPT_S, _ATTEMPT_S = 1.5, 5.0


class StartupError(RuntimeError):
    """A worker cannot start (or go on: Kafka lost mid-run); ``str()`` is the one line to
    print, ``code`` the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---- /healthz while starting --------------------------------------------------------


class _NoMetrics:
    def collect(self):
        return iter(())


class StartupHealth:
    """What /metrics and /healthz serve: the phase while starting, then the worker's own.

    Every phase before the worker runs is unhealthy (503), as before this existed the
    endpoint did not answer at all: the k8s startupProbe waits through the model load.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase = "starting"
        self._worker: Any = None
        self._watch: Any = None

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self._phase = phase

    def attach(self, worker: Any, watch: Any = None) -> None:
        with self._lock:
            self._worker, self._watch = worker, watch

    def status(self) -> tuple[bool, str]:
        with self._lock:
            worker, phase, watch = self._worker, self._phase, self._watch
        if worker is None:
            return False, phase
        if watch is not None and watch.unreachable:
            return False, "broker unreachable"
        ok = worker.metrics.healthy()
        return ok, "ok" if ok else "stalled"

    def collect(self):  # the registry interface generate_latest needs
        worker = self._worker
        return (worker.metrics.registry if worker is not None else _NoMetrics()).collect()


# ---- output and checkpoint locations -------------------------------------------------


def check_writable(location: str, what: str, fix: str) -> None:
    """Write and delete a probe file (local) or object (s3://) under ``location``."""
    from spotbatch.storage import S3Store, join_uri, parse_uri, store_for

    name = f"{PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        loc = parse_uri(location)
        if loc.scheme == "s3":
            probe = join_uri(location, name)
            store = store_for(probe)
            store.write_atomic(probe, b"")
            if isinstance(store, S3Store):  # always, for s3:// (a test may swap the store)
                store.delete(probe)
        else:
            _probe_folder(loc.path, name)
    except Exception as exc:  # noqa: BLE001 - any failure gets the same fix
        raise StartupError(f"{what} {location} is not writable ({_one_line(exc)}); {fix}", EXIT_LOCATION) from None


def _probe_folder(folder: str, name: str) -> None:
    """Create the folder if need be, write and delete a file, and remove the folders it
    created (the sink and the checkpoint store create them when they write)."""
    created, cur = [], os.path.abspath(folder)
    while not os.path.exists(cur):
        created.append(cur)
        cur = os.path.dirname(cur)
    os.makedirs(folder, exist_ok=True)
    try:
        path = os.path.join(folder, name)
        with open(path, "wb") as fh:
            fh.write(b"")
        os.unlink(path)
    finally:
        for made in created:  # innermost first
            try:
                os.rmdir(made)
            except OSError:
                break


def check_locations(settings: Settings) -> None:
    """The output prefix and the checkpoint store both take a probe write."""
    check_writable(settings.output, "output", "pass a writable folder or s3://bucket/prefix to --output "
                   "(env SPOTBATCH_OUTPUT) and check its permissions / credentials")
    ckpt = settings.checkpoint_location()
    if ckpt != settings.output:
        check_writable(ckpt, "checkpoint location", "pass a writable folder or s3://bucket/prefix to "
                       "--checkpoint-uri (env SPOTBATCH_CHECKPOINT_URI; default <output>/_checkpoints) "
                       "and check its permissions / credentials")


# ---- the broker ----------------------------------------------------------------------


def broker_unreachable(settings: Settings, waited_s: float, exc: BaseException | None = None) -> StartupError:
    detail = f" ({_one_line(exc)})" if exc is not None and not _is_plain_timeout(exc) else ""
    return StartupError(
        f"cannot reach Kafka at {settings.kafka_bootstrap} after {waited_s:.0f}s{detail}; check "
        "SPOTBATCH_KAFKA_BOOTSTRAP / --bootstrap and that the broker is up", EXIT_BROKER)


def wait_for_broker(settings: Settings, *, on_unreachable: Callable[[], None] = lambda: None,
                    probe: Callable[[Settings, float], None] | None = None) -> float:
    """Return once one Kafka bootstrap succeeds; raise StartupError after ``broker_wait_s``.

    Tries are short (a few seconds each) with a 1 s reconnect backoff, so a broker that
    comes up late is seen within about a second. kafka-python's own connect errors are
    kept out of the log while waiting (they are one ERROR line per try); this logs one
    WARNING at the first failure. Returns the seconds waited.
    """
    probe = probe or _bootstrap_once
    started = time.monotonic()
    deadline = started + settings.broker_wait_s
    last: BaseException | None = None
    warned = False
    with _quiet_kafka():
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise broker_unreachable(settings, time.monotonic() - started, last)
            try:
                probe(settings, min(_ATTEMPT_S if warned else _FIRST_ATTEMPT_S, left))
                if warned:
                    log.info("Kafka reachable after %.1fs", time.monotonic() - started)
                return time.monotonic() - started
            except Exception as exc:  # noqa: BLE001 - kafka-python raises several kinds
                last = exc
                if not _is_retriable(exc):  # e.g. SASL authentication failed: waiting will not help
                    raise broker_unreachable(settings, time.monotonic() - started, exc) from None
                on_unreachable()
                if not warned:
                    warned = True
                    # The address is left to the final line: one line names it, with the fix.
                    detail = "" if _is_plain_timeout(exc) else f" ({_one_line(exc)})"
                    log.warning("Kafka not reachable yet%s; retrying for up to %.0fs in all (/healthz: broker "
                                "unreachable)", detail, settings.broker_wait_s)
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _bootstrap_once(settings: Settings, timeout_s: float) -> None:
    from kafka import KafkaConsumer

    from spotbatch.kafka_security import client_options

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id="spotbatch-probe",
                             bootstrap_timeout_ms=max(100, int(timeout_s * 1000)),
                             reconnect_backoff_ms=50, reconnect_backoff_max_ms=1000,
                             enable_auto_commit=False, **client_options(settings))
    consumer.close(autocommit=False)


def _is_retriable(exc: BaseException) -> bool:
    if isinstance(exc, (*BOOTSTRAP_ERRORS, OSError, TimeoutError)):
        return True
    return isinstance(exc, _kafka_errors.KafkaError) and bool(getattr(exc, "retriable", False))


def _is_plain_timeout(exc: BaseException) -> bool:
    return isinstance(exc, BOOTSTRAP_ERRORS)


class _quiet_kafka:
    """Raise the ``kafka`` logger above ERROR for the duration (the probe's retries)."""

    def __enter__(self) -> None:
        self._logger = logging.getLogger("kafka")
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL + 1)

    def __exit__(self, *exc_info: object) -> None:
        self._logger.setLevel(self._level)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    kind = type(exc).__name__
    return f"{kind}: {text}" if text and not text.startswith(kind) else (text or kind)


# ---- the broker, while running -------------------------------------------------------


def _tcp_reachable(settings: Settings, timeout_s: float) -> bool:
    """Any bootstrap server accepts a TCP connection (quiet, and touches no Kafka client)."""
    import socket

    for server in settings.kafka_bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


class BrokerWatch:
    """Notices a broker lost mid-run: kafka-python's poll() does not raise then, it
    returns nothing, so the owner loop turns on and /healthz would stay green.

    A daemon thread checks every ``every_s`` (default 5 s) that a bootstrap server accepts TCP. While
    none does, ``unreachable`` is true (/healthz: 503 "broker unreachable"). After
    ``broker_wait_s`` of that, it asks the worker to stop now: outputs already written
    stay (a redelivered job finds them and is reported ``already_done``); offsets not
    committed are redelivered. If the stop cannot finish within ``grace_s`` (a commit
    with no broker blocks), it prints :meth:`message` and exits the process with 1.
    """

    def __init__(self, settings: Settings, worker: Any, *, every_s: float | None = None, grace_s: float = 10.0,
                 reachable: Callable[[Settings, float], bool] = _tcp_reachable) -> None:
        self._settings, self._worker = settings, worker
        every_s = every_s or min(5.0, max(0.5, settings.broker_wait_s / 2))  # 5 s at the default 60 s
        self._every_s, self._grace_s, self._reachable = every_s, grace_s, reachable
        self._stop = threading.Event()
        self.unreachable = False
        self.lost_s: float | None = None  # set once the worker was told to stop for it
        self._thread = threading.Thread(target=self._run, name="broker-watch", daemon=True)

    def start(self) -> "BrokerWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def message(self) -> str:
        return (f"lost Kafka at {self._settings.kafka_bootstrap}: unreachable for {self.lost_s or 0:.0f}s "
                "(broker_wait_s); outputs written so far are kept, uncommitted jobs are redelivered; check "
                "SPOTBATCH_KAFKA_BOOTSTRAP / --bootstrap and that the broker is up")

    def _run(self) -> None:
        since: float | None = None
        while not self._stop.wait(self._every_s):
            if self._reachable(self._settings, min(3.0, self._every_s)):
                if since is not None:
                    log.info("Kafka reachable again after %.1fs", time.monotonic() - since)
                since, self.unreachable = None, False
                continue
            now = time.monotonic()
            if since is None:
                since = now
                log.warning("Kafka not reachable; the worker stops if this lasts %.0fs (/healthz: broker "
                            "unreachable)", self._settings.broker_wait_s)
            self.unreachable = True
            if now - since >= self._settings.broker_wait_s:
                self.lost_s = now - since
                self._worker.request_stop(now=True, reason="kafka unreachable")
                if not self._stop.wait(self._grace_s):  # the stop hung (a commit with no broker)
                    import sys

                    sys.stderr.write(f"error: {self.message()}\n")
                    sys.stderr.flush()
                    os._exit(EXIT_BROKER)
                return
