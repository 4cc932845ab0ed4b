"""Spot interruption notices: watch the cloud metadata endpoints and POSIX signals.

A watcher calls ``on_notice(Notice)`` once per distinct notice; the worker then stops
fetching, saves progress and leaves the group inside the window (DESIGN invariant 3).

Sources (facts in ref/FACTS.md, "Spot interruptions"):

* ``AwsWatcher``: IMDSv2. ``PUT /latest/api/token`` (header
  ``X-aws-ec2-metadata-token-ttl-seconds: 21600``), then GETs with
  ``X-aws-ec2-metadata-token`` of ``/latest/meta-data/spot/instance-action`` (404 until a
  notice; ``{"action", "time"}``) and ``/latest/meta-data/events/recommendations/rebalance``
  (``{"noticeTime"}``). No IMDSv1 fallback: where pods cannot reach IMDS (hop limit 1 on
  EKS), the node drain's SIGTERM (Karpenter, aws-node-termination-handler) is the notice.
* ``GcpWatcher``: ``GET /computeMetadata/v1/instance/preempted`` with
  ``Metadata-Flavor: Google`` -> ``TRUE``/``FALSE``. Plain polling, not
  ``?wait_for_change=true``: a blocking GET would delay ``stop()``, and without ETag
  bookkeeping a flip between two requests would be missed. 1 s polls fit the 30 s window.
* ``AzureWatcher``: ``GET /metadata/scheduledevents?api-version=2020-07-01`` with
  ``Metadata: true``; ``Preempt`` (and ``Terminate``) events for this VM. The watcher
  acknowledges (POST ``StartRequests``) in ``acknowledge()``, which ``stop()`` calls, not
  on sight: an acknowledgement tells Azure to go ahead *now*, which would cut the drain
  window we are trying to use. Call ``stop()`` after draining.
* ``SignalWatcher``: SIGTERM/SIGINT (Kubernetes sends SIGTERM before SIGKILL).

Base URLs: constructor argument, else settings ``aws_metadata_url``, ``gcp_metadata_url``,
``azure_metadata_url`` (env ``SPOTBATCH_AWS_METADATA_URL`` etc., read by ``watchers_for``
when not passed), else the providers' addresses. ``watchers_for("auto")`` probes each
cloud once (about 0.3 s, all in parallel) and keeps those that answer *like that
provider* (AWS and Azure share 169.254.169.254, so "something answered" is not
enough). A missed probe leaves the cloud out: name the cloud to always poll it.

Requests bypass any HTTP(S)_PROXY: metadata addresses are link-local and a proxy
would either fail or, worse, answer for another machine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import http.client
import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import Message
from email.utils import parsedate_to_datetime
from typing import Callable, Iterator, Optional, Protocol, cast, runtime_checkable

from spotbatch.config import env_setting
from spotbatch.retry import TryAgain, attempts

__all__ = [
    "AwsWatcher",
    "AzureWatcher",
    "GcpWatcher",
    "Notice",
    "SOURCES",
    "SignalWatcher",
    "Watcher",
    "watchers_for",
]

log = logging.getLogger("spotbatch.preemption")

SOURCES = ("auto", "aws", "gcp", "azure", "signal", "none")
GCP_NOTICE_S = 30.0  # Spot VMs: ACPI soft off, hard off 30 s later
AZURE_MIN_NOTICE_S = 30.0  # Preempt events come at least 30 s ahead
_JOIN_S = 1.0  # stop() waits this long for a poll in flight; the thread is a daemon anyway
_NETWORK_ERRORS = (OSError, http.client.HTTPException)  # URLError and timeouts are OSErrors
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Notice:
    """An interruption notice. ``deadline_s``: seconds from now until the instance goes,
    when the provider says (None for signals and advisory rebalance recommendations)."""

    kind: str  # "terminate" | "rebalance"
    source: str  # "aws" | "gcp" | "azure" | "signal"
    deadline_s: Optional[float]
    detail: str


@runtime_checkable
class Watcher(Protocol):
    def start(self, on_notice: Callable[[Notice], None]) -> None: ...

    def stop(self) -> None: ...


class _Unexpected(Exception):
    """The endpoint answered, but not as the provider documents."""


@dataclass
class _Reply:
    status: int
    headers: Message
    body: bytes


def _request(method: str, url: str, headers: dict, *, timeout_s: float, body: bytes | None = None) -> _Reply:
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with _OPENER.open(req, timeout=timeout_s) as resp:
            return _Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:  # 401/404 are answers here, not failures
        with err:
            return _Reply(err.code, err.headers, err.read())


def _seconds_until(when: datetime) -> float:
    if when.tzinfo is None:  # both providers speak UTC
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - time.time())


class _PollingWatcher(ABC):
    """One daemon thread: poll, deliver new notices, sleep ``interval_s``; never raises."""

    source = ""

    def __init__(self, base_url: str, *, interval_s: float, timeout_s: float) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be > 0")
        self.base_url = base_url.rstrip("/")
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._stop_event = threading.Event()
        # Held while a callback runs, so that once stop() returns no callback starts or
        # is still running; re-entrant so a callback may itself call stop().
        self._emit_lock = threading.RLock()
        self._seen: set = set()
        self._on_notice: Callable[[Notice], None] | None = None
        self._thread: threading.Thread | None = None
        self._last_problem = ""

    def start(self, on_notice: Callable[[Notice], None]) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._on_notice = on_notice
        self._thread = threading.Thread(target=self._run, name=f"preemption-{self.source}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop_event.set()
        with self._emit_lock:
            pass  # wait out a callback in flight
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_S)

    def _run(self) -> None:
        while not self._stop_event.is_set():
            try:
                for key, notice in self._poll():
                    self._emit(key, notice)
            except _NETWORK_ERRORS as exc:  # off-cloud the endpoint is simply absent
                log.debug("%s metadata at %s unreachable: %s", self.source, self.base_url, exc)
            except Exception as exc:  # noqa: BLE001 - a watcher thread must not die
                problem = f"{type(exc).__name__}: {exc}"
                if problem != self._last_problem:  # once per distinct problem, not per poll
                    log.warning("%s metadata at %s: %s", self.source, self.base_url, problem)
                self._last_problem = problem
            self._stop_event.wait(self.interval_s)

    def _emit(self, key: object, notice: Notice) -> bool:
        """Deliver ``notice`` unless already delivered or stopped; True if delivered."""
        with self._emit_lock:
            if self._stop_event.is_set() or key in self._seen:
                return False
            self._seen.add(key)
            log.warning("interruption notice: %s", notice)
            callback = self._on_notice
            try:
                if callback is not None:  # start() sets it before the thread runs
                    callback(notice)
            except Exception:  # noqa: BLE001 - the caller's bug must not stop the watch
                log.exception("preemption callback failed for %s", notice)
            return True

    @abstractmethod
    def _poll(self) -> Iterator[tuple[object, Notice]]:
        """Each provider's own answer."""

    @classmethod
    @abstractmethod
    def probe(cls, base_url: str, timeout_s: float) -> bool:
        """Whether this provider's metadata endpoint answers at ``base_url`` (for "auto")."""


class AwsWatcher(_PollingWatcher):
    source = "aws"
    TOKEN_PATH = "/latest/api/token"
    ACTION_PATH = "/latest/meta-data/spot/instance-action"
    REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
    TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
    TOKEN_HEADER = "X-aws-ec2-metadata-token"

    def __init__(
        self,
        base_url: str = "http://169.254.169.254",
        *,
        interval_s: float = 5.0,
        timeout_s: float = 2.0,
        token_ttl_s: int = 21600,
    ) -> None:
        super().__init__(base_url, interval_s=interval_s, timeout_s=timeout_s)
        self.token_ttl_s = token_ttl_s
        self._token: str | None = None
        self._token_refresh_at = 0.0

    @classmethod
    def probe(cls, base_url: str, timeout_s: float) -> bool:
        reply = _request("PUT", base_url.rstrip("/") + cls.TOKEN_PATH, {cls.TTL_HEADER: "21600"}, timeout_s=timeout_s)
        return reply.status == 200 and bool(reply.body.strip())

    def _poll(self) -> Iterator[tuple[object, Notice]]:
        # Terminate first: when both are up, it is the one that matters.
        reply = self._get(self.ACTION_PATH)
        if reply.status == 200:
            doc = json.loads(reply.body)
            action, when = doc.get("action", "terminate"), doc.get("time", "")
            detail = f"spot instance-action {action} at {when}"
            yield ("action", action, when), Notice("terminate", "aws", _iso_deadline(when), detail)
        elif reply.status != 404:
            raise _Unexpected(f"{self.ACTION_PATH} answered {reply.status}")
        reply = self._get(self.REBALANCE_PATH)
        if reply.status == 200:
            when = json.loads(reply.body).get("noticeTime", "")
            yield ("rebalance", when), Notice("rebalance", "aws", None, f"rebalance recommendation at {when}")
        elif reply.status != 404:
            raise _Unexpected(f"{self.REBALANCE_PATH} answered {reply.status}")

    def _get(self, path: str) -> _Reply:
        try:
            return self._get_with_token(path)
        except TryAgain:
            raise _Unexpected(f"{path} answered 401 with a fresh token") from None

    @attempts("imds token", retry_on=TryAgain, max_attempts=2)  # a fresh token once, then give up
    def _get_with_token(self, path: str) -> _Reply:
        reply = _request("GET", self.base_url + path, {self.TOKEN_HEADER: self._current_token()}, timeout_s=self.timeout_s)
        if reply.status == 401:
            self._token = None  # expired or revoked: the next try takes a fresh one
            raise TryAgain(f"{path} answered 401")
        return reply

    def _current_token(self) -> str:
        now = time.monotonic()
        if self._token is None or now >= self._token_refresh_at:
            headers = {self.TTL_HEADER: str(self.token_ttl_s)}
            reply = _request("PUT", self.base_url + self.TOKEN_PATH, headers, timeout_s=self.timeout_s)
            if reply.status != 200:
                raise _Unexpected(f"token PUT answered {reply.status}")
            self._token = reply.body.decode().strip()
            # Renew a little before expiry so no GET races the TTL.
            self._token_refresh_at = now + self.token_ttl_s - min(60.0, self.token_ttl_s / 10)
        return self._token


def _iso_deadline(text: str) -> Optional[float]:
    try:  # "2026-01-01T00:00:00Z"; fromisoformat only learned "Z" in 3.11
        return _seconds_until(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return None  # still a notice: draining early beats missing it


class GcpWatcher(_PollingWatcher):
    source = "gcp"
    PATH = "/computeMetadata/v1/instance/preempted"
    HEADERS = {"Metadata-Flavor": "Google"}

    def __init__(self, base_url: str = "http://metadata.google.internal", *, interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        super().__init__(base_url, interval_s=interval_s, timeout_s=timeout_s)

    @classmethod
    def probe(cls, base_url: str, timeout_s: float) -> bool:
        reply = _request("GET", base_url.rstrip("/") + cls.PATH, cls.HEADERS, timeout_s=timeout_s)
        return reply.status == 200 and reply.headers.get("Metadata-Flavor") == "Google"

    def _poll(self) -> Iterator[tuple[object, Notice]]:
        reply = _request("GET", self.base_url + self.PATH, self.HEADERS, timeout_s=self.timeout_s)
        # The real server stamps every answer; anything else is not a GCE metadata server.
        if reply.status != 200 or reply.headers.get("Metadata-Flavor") != "Google":
            raise _Unexpected(f"{self.PATH} answered {reply.status} without Metadata-Flavor: Google")
        if reply.body.strip() == b"TRUE":
            yield "preempted", Notice("terminate", "gcp", GCP_NOTICE_S, "instance/preempted is TRUE")


class AzureWatcher(_PollingWatcher):
    source = "azure"
    API_VERSION = "2020-07-01"
    EVENTS_PATH = "/metadata/scheduledevents"
    NAME_PATH = "/metadata/instance/compute/name"
    VERSIONS_PATH = "/metadata/versions"
    HEADERS = {"Metadata": "true"}
    EVENT_TYPES = ("Preempt", "Terminate")  # both take the VM away; Freeze/Reboot do not

    def __init__(
        self,
        base_url: str = "http://169.254.169.254",
        *,
        interval_s: float = 1.0,
        timeout_s: float = 2.0,
        vm_name: str | None = None,
        ack_on_stop: bool = True,
    ) -> None:
        super().__init__(base_url, interval_s=interval_s, timeout_s=timeout_s)
        self.vm_name = vm_name
        self.ack_on_stop = ack_on_stop
        self._name_known = vm_name is not None
        self._ack_lock = threading.Lock()
        self._delivered: list[str] = []  # event ids the caller was told about
        self._acked: set[str] = set()

    @property
    def events_url(self) -> str:
        return f"{self.base_url}{self.EVENTS_PATH}?api-version={self.API_VERSION}"

    @classmethod
    def probe(cls, base_url: str, timeout_s: float) -> bool:
        # Not scheduledevents itself: its first call per VM may take minutes to answer.
        reply = _request("GET", base_url.rstrip("/") + cls.VERSIONS_PATH, cls.HEADERS, timeout_s=timeout_s)
        return reply.status == 200 and b"apiVersions" in reply.body

    def stop(self) -> None:
        super().stop()
        if self.ack_on_stop:
            self.acknowledge()

    def acknowledge(self) -> list[str]:
        """POST ``StartRequests`` for each delivered event not yet acknowledged (once per
        id); returns the ids acknowledged now. Call once drained: it lets Azure proceed."""
        done = []
        with self._ack_lock:  # held across the POSTs so two callers never ack twice
            for event_id in [e for e in self._delivered if e not in self._acked]:
                body = json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()
                headers = {**self.HEADERS, "Content-Type": "application/json"}
                try:
                    reply = _request("POST", self.events_url, headers, body=body, timeout_s=self.timeout_s)
                except _NETWORK_ERRORS as exc:
                    log.debug("azure ack of %s failed: %s", event_id, exc)
                    continue
                if 200 <= reply.status < 300:
                    self._acked.add(event_id)
                    done.append(event_id)
                else:
                    log.warning("azure ack of %s answered %s", event_id, reply.status)
        return done

    def _emit(self, key: object, notice: Notice) -> bool:
        delivered = super()._emit(key, notice)
        if delivered:
            with self._ack_lock:
                self._delivered.append(cast(tuple, key)[1])  # key is ("event", EventId)
        return delivered

    def _poll(self) -> Iterator[tuple[object, Notice]]:
        self._learn_vm_name()
        reply = _request("GET", self.events_url, self.HEADERS, timeout_s=self.timeout_s)
        if reply.status != 200:
            raise _Unexpected(f"{self.EVENTS_PATH} answered {reply.status}")
        for event in json.loads(reply.body).get("Events", []):
            if event.get("EventType") not in self.EVENT_TYPES or not self._is_ours(event):
                continue
            event_id = event["EventId"]
            detail = f"scheduled event {event['EventType']} {event_id} not before {event.get('NotBefore') or '-'}"
            yield ("event", event_id), Notice("terminate", "azure", _rfc1123_deadline(event.get("NotBefore")), detail)

    def _is_ours(self, event: dict) -> bool:
        # Events for every VM in the availability set / placement group show up here;
        # acting on (or acking) another VM's eviction would be wrong twice over.
        resources = event.get("Resources") or []
        if not resources or not self.vm_name:
            return True  # cannot tell: drain rather than risk the window
        return self.vm_name.casefold() in (r.casefold() for r in resources)

    def _learn_vm_name(self) -> None:
        if self._name_known:
            return
        url = f"{self.base_url}{self.NAME_PATH}?api-version={self.API_VERSION}&format=text"
        reply = _request("GET", url, self.HEADERS, timeout_s=self.timeout_s)  # network errors: retry next poll
        self._name_known = True
        if reply.status == 200:
            self.vm_name = reply.body.decode().strip() or None


def _rfc1123_deadline(text: str | None) -> float:
    if text:  # "Mon, 19 Sep 2016 18:29:47 GMT"; empty once the event has started
        try:
            return _seconds_until(parsedate_to_datetime(text))
        except (TypeError, ValueError):
            pass
    return AZURE_MIN_NOTICE_S


class SignalWatcher:
    """SIGTERM/SIGINT -> Notice; a second signal says "(again)" so the caller can escalate.

    Python runs handlers in the main thread only, so start()/stop() must run there, and
    ``on_notice`` runs inside a signal handler: keep it short (set a flag, an Event)."""

    source = "signal"

    def __init__(self, signals: tuple = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self._previous: dict = {}
        self._count = 0
        self._on_notice: Callable[[Notice], None] | None = None

    def start(self, on_notice: Callable[[Notice], None]) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("SignalWatcher.start() must run in the main thread (Python delivers signals there only)")
        if self._previous:
            raise RuntimeError("SignalWatcher already started")
        self._on_notice = on_notice
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def stop(self) -> None:
        for sig, previous in self._previous.items():
            # None: a handler not installed from Python; the default is the best we can do.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, _frame: object) -> None:
        self._count += 1
        name = signal.Signals(signum).name
        detail = name if self._count == 1 else f"{name} (again)"
        callback = self._on_notice
        try:
            if callback is not None:  # start() sets it before installing the handler
                callback(Notice("terminate", "signal", None, detail))
        except Exception:  # noqa: BLE001 - raising here would surface at a random line
            log.exception("preemption callback failed for %s", detail)


_CLOUDS: dict[str, type[_PollingWatcher]] = {"aws": AwsWatcher, "gcp": GcpWatcher, "azure": AzureWatcher}
_SETTING = {"aws": "aws_metadata_url", "gcp": "gcp_metadata_url", "azure": "azure_metadata_url"}  # Settings keys
_DEFAULT_URLS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal", "azure": "http://169.254.169.254"}


def watchers_for(
    source: str,
    *,
    aws_url: str | None = None,
    gcp_url: str | None = None,
    azure_url: str | None = None,
    interval_s: float | None = None,
    probe_timeout_s: float = 0.3,
) -> list[Watcher]:
    """Watchers for ``source`` (one of SOURCES). Every source but "none" includes the
    SignalWatcher; a named cloud is polled without probing; "auto" probes all three."""
    choice = source.strip().lower()
    if choice not in SOURCES:
        raise ValueError(f"unknown preemption source {source!r}: choose one of {', '.join(SOURCES)}")
    if choice == "none":
        return []
    given = {"aws": aws_url, "gcp": gcp_url, "azure": azure_url}
    urls = {c: given[c] or env_setting(_SETTING[c]) or _DEFAULT_URLS[c] for c in _CLOUDS}
    clouds = _answering(urls, probe_timeout_s) if choice == "auto" else [c for c in _CLOUDS if c == choice]
    kwargs = {} if interval_s is None else {"interval_s": interval_s}
    return [_CLOUDS[c](urls[c], **kwargs) for c in clouds] + [SignalWatcher()]


def _answering(urls: dict[str, str], timeout_s: float) -> list[str]:
    """Probe the clouds in parallel daemon threads; the join deadline also bounds DNS
    (getaddrinfo ignores socket timeouts), so "auto" costs about timeout_s off-cloud."""
    found: dict[str, bool] = {}

    def probe(cloud: str) -> None:
        try:
            found[cloud] = _CLOUDS[cloud].probe(urls[cloud], timeout_s)
        except Exception as exc:  # noqa: BLE001 - unreachable is the common answer
            log.debug("%s metadata at %s: no answer (%s)", cloud, urls[cloud], exc)

    threads = [threading.Thread(target=probe, args=(c,), daemon=True) for c in _CLOUDS]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s + 0.2
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    answering = [c for c in _CLOUDS if found.get(c)]
    log.info("preemption: metadata endpoints answering: %s", ", ".join(answering) or "none")
    return answering
