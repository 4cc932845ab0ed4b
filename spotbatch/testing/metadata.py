"""Fake cloud metadata servers that answer as AWS IMDSv2, GCE and Azure IMDS do.

Each is a real HTTP server on 127.0.0.1 (a free port) in a daemon thread, used as a
context manager; ``.url`` is its base URL and ``.requests`` records every request
(method, path, lower-cased headers, body, status answered) so tests can assert on
headers. For unit tests, chaos tests and the demo:

    with FakeAws() as aws:
        watcher = AwsWatcher(aws.url, interval_s=0.05)
        aws.notice(action="terminate", in_s=120)

Also ``unreachable_url()`` (a port nothing listens on) and ``HangingServer`` (accepts
connections, never answers) for the failure paths.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import json
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

__all__ = ["FakeAws", "FakeAzure", "FakeGcp", "HangingServer", "Recorded", "unreachable_url"]

_Answer = tuple  # (status, headers: dict, body: bytes)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str  # as sent, query included
    headers: dict  # lower-cased names
    body: bytes
    status: int

    @property
    def route(self) -> str:
        return urlsplit(self.path).path

    @property
    def query(self) -> dict:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}


class _FakeMetadata(ABC):
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.delay_s = 0.0  # answer this much later: a slow or overloaded endpoint
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def _running(self) -> ThreadingHTTPServer:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not running: use it as a context manager")
        return self._server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._running().server_address[1]}"

    def requests_to(self, route: str, method: str | None = None) -> list:
        with self._lock:
            return [r for r in self.requests if r.route == route and (method is None or r.method == method)]

    def __enter__(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _dispatch(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                time.sleep(fake.delay_s)
                with fake._lock:  # state and log change together
                    status, reply_headers, payload = fake._answer(self.command, self.path, headers, body)
                    fake.requests.append(Recorded(self.command, self.path, headers, body, status))
                self.send_response(status)
                for name, value in reply_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = _dispatch

            def log_message(self, *_args) -> None:  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *_exc) -> None:
        server = self._running()
        server.shutdown()
        server.server_close()

    @abstractmethod
    def _answer(self, method: str, path: str, headers: dict, body: bytes) -> _Answer:
        """Each provider's own answer."""


def _text(status: int, text: str, **headers: str) -> _Answer:
    return status, {"Content-Type": "text/plain", **headers}, text.encode()


def _json(status: int, doc: object, **headers: str) -> _Answer:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(doc).encode()


class FakeAws(_FakeMetadata):
    """IMDSv2 with tokens required: GETs without a live token get 401."""

    TOKEN = "/latest/api/token"
    ACTION = "/latest/meta-data/spot/instance-action"
    REBALANCE = "/latest/meta-data/events/recommendations/rebalance"

    def __init__(self) -> None:
        super().__init__()
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._action: dict | None = None
        self._rebalance: dict | None = None

    def notice(self, action: str = "terminate", in_s: float = 120.0) -> None:
        with self._lock:
            self._action = {"action": action, "time": _iso(time.time() + in_s)}

    def rebalance(self) -> None:
        with self._lock:
            self._rebalance = {"noticeTime": _iso(time.time())}

    def expire_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def _answer(self, method, path, headers, body):
        route = urlsplit(path).path
        if route == self.TOKEN:
            if method != "PUT":
                return _text(405, "405 - Method Not Allowed")
            if "x-forwarded-for" in headers:  # IMDSv2 refuses proxied token requests
                return _text(403, "403 - Forbidden")
            ttl = headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return _text(400, "400 - Bad Request")
            token = secrets.token_urlsafe(32)
            self._tokens[token] = time.monotonic() + int(ttl)
            return _text(200, token, **{"X-aws-ec2-metadata-token-ttl-seconds": ttl})
        if method != "GET":
            return _text(405, "405 - Method Not Allowed")
        expiry = self._tokens.get(headers.get("x-aws-ec2-metadata-token", ""))
        if expiry is None or expiry <= time.monotonic():
            return _text(401, "401 - Unauthorized")
        if route == self.ACTION and self._action:
            return _text(200, json.dumps(self._action))
        if route == self.REBALANCE and self._rebalance:
            return _text(200, json.dumps(self._rebalance))
        return _text(404, "404 - Not Found")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeGcp(_FakeMetadata):
    """GCE metadata: Metadata-Flavor: Google required (else 403), stamped on every answer."""

    PREEMPTED = "/computeMetadata/v1/instance/preempted"

    def __init__(self) -> None:
        super().__init__()
        self._preempted = False

    def preempt(self) -> None:
        with self._lock:
            self._preempted = True

    def _answer(self, method, path, headers, body):
        stamp = {"Metadata-Flavor": "Google"}
        if headers.get("metadata-flavor") != "Google" or "x-forwarded-for" in headers:
            return _text(403, "Missing required header: Metadata-Flavor", **stamp)
        if method == "GET" and urlsplit(path).path == self.PREEMPTED:
            return 200, {"Content-Type": "application/text", **stamp}, b"TRUE" if self._preempted else b"FALSE"
        return _text(404, "Not Found", **stamp)


class FakeAzure(_FakeMetadata):
    """Azure IMDS: Metadata: true required (else 400), api-version required; scheduled
    events as {"DocumentIncarnation", "Events"}; POSTed acks recorded in ``.acks``."""

    EVENTS = "/metadata/scheduledevents"
    NAME = "/metadata/instance/compute/name"
    VERSIONS = "/metadata/versions"

    def __init__(self, vm_name: str = "spot-vm-0") -> None:
        super().__init__()
        self.vm_name = vm_name
        self.incarnation = 1
        self.events: list[dict] = []
        self.acks: list[str] = []

    def add_event(self, event_type: str = "Preempt", *, in_s: float | None = 30.0, resources: list | None = None) -> str:
        """Schedule an event; ``in_s=None`` leaves NotBefore empty (as once started)."""
        event_id = str(uuid.uuid4()).upper()
        not_before = "" if in_s is None else format_datetime(datetime.fromtimestamp(time.time() + in_s, timezone.utc), usegmt=True)
        with self._lock:
            self.events.append({
                "EventId": event_id,
                "EventStatus": "Scheduled",
                "EventType": event_type,
                "ResourceType": "VirtualMachine",
                "Resources": [self.vm_name] if resources is None else resources,
                "NotBefore": not_before,
                "Description": f"{event_type} scheduled by the fake",
                "EventSource": "Platform",
                "DurationInSeconds": -1,
            })
            self.incarnation += 1
        return event_id

    def preempt(self, *, in_s: float | None = 30.0, resources: list | None = None) -> str:
        return self.add_event("Preempt", in_s=in_s, resources=resources)

    def _answer(self, method, path, headers, body):
        if headers.get("metadata", "").lower() != "true" or "x-forwarded-for" in headers:
            return _json(400, {"error": "Bad request. Required metadata header not specified"})
        route, query = urlsplit(path).path, parse_qs(urlsplit(path).query)
        if route == self.VERSIONS and method == "GET":
            return _json(200, {"apiVersions": ["2019-06-01", "2020-07-01", "2021-02-01"]})
        if "api-version" not in query:
            return _json(400, {"error": "Bad request. api-version was not specified in the request"})
        if route == self.NAME and method == "GET":
            return _text(200, self.vm_name)
        if route == self.EVENTS and method == "GET":
            return _json(200, {"DocumentIncarnation": self.incarnation, "Events": self.events})
        if route == self.EVENTS and method == "POST":
            return self._start(body)
        return _json(404, {"error": "Not found"})

    def _start(self, body: bytes) -> _Answer:
        try:
            ids = [r["EventId"] for r in json.loads(body)["StartRequests"]]
        except (ValueError, KeyError, TypeError):
            return _json(400, {"error": "Bad request. Malformed StartRequests"})
        for event in self.events:
            if event["EventId"] in ids:
                event["EventStatus"] = "Started"
        self.acks.extend(ids)
        self.incarnation += 1
        return 200, {}, b""


def unreachable_url() -> str:
    """A loopback URL whose port was just free: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


class HangingServer:
    """Listens (so connects succeed) but never accepts: every request times out."""

    def __enter__(self) -> HangingServer:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        return self

    def __exit__(self, *_exc) -> None:
        self._sock.close()
