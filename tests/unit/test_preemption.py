"""Preemption watchers against fake metadata servers that answer as the providers do.

"No notice" assertions first wait until the fake has seen several polls, so they can
fail: a watcher that never polled would not pass them by accident.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spotbatch.workers.preemption import (
    AwsWatcher,
    AzureWatcher,
    GcpWatcher,
    Notice,
    SignalWatcher,
    Watcher,
    watchers_for,
)
from tests.fake_metadata import FakeAws, FakeAzure, FakeGcp, HangingServer, unreachable_url

FAST = 0.05  # poll interval for tests


class Collector:
    """on_notice callback that records what it got."""

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self._lock = threading.Lock()

    def __call__(self, notice: Notice) -> None:
        with self._lock:
            self.notices.append(notice)


def wait_until(predicate, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@contextmanager
def running(watcher):
    got = Collector()
    watcher.start(got)
    try:
        yield got
    finally:
        watcher.stop()


def polls(fake, route: str, n: int = 4) -> bool:
    return wait_until(lambda: len(fake.requests_to(route, "GET")) >= n)


def urlopen_status(url: str, headers: dict, method: str = "GET") -> int:
    req = urllib.request.Request(url, headers=headers, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@contextmanager
def anything_goes(body: bytes):
    """Answers 200 + body to every request, like a captive portal or a stray proxy."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_POST = do_GET

        def log_message(self, *_args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- defaults and the protocol ---------------------------------------------------


def test_defaults_follow_the_providers():
    aws, gcp, azure = AwsWatcher(), GcpWatcher(), AzureWatcher()
    assert (aws.base_url, aws.interval_s, aws.token_ttl_s) == ("http://169.254.169.254", 5.0, 21600)
    assert (gcp.base_url, gcp.interval_s) == ("http://metadata.google.internal", 1.0)
    assert (azure.base_url, azure.interval_s) == ("http://169.254.169.254", 1.0)
    assert azure.events_url == "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01"
    for w in (aws, gcp, azure, SignalWatcher()):
        assert isinstance(w, Watcher)


# --- AWS ---------------------------------------------------------------------------


def test_aws_no_notice_no_callback_and_token_sent():
    with FakeAws() as fake, running(AwsWatcher(fake.url, interval_s=FAST)) as got:
        assert polls(fake, FakeAws.ACTION)
        assert polls(fake, FakeAws.REBALANCE)
        assert got.notices == []
    puts = fake.requests_to(FakeAws.TOKEN, "PUT")
    assert len(puts) == 1  # one token reused across polls
    assert puts[0].headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    gets = [r for r in fake.requests if r.method == "GET"]
    assert gets and all(r.headers.get("x-aws-ec2-metadata-token") for r in gets)
    assert {r.status for r in gets} == {404}


def test_aws_fake_requires_a_token():
    with FakeAws() as fake:
        assert urlopen_status(fake.url + FakeAws.ACTION, {}) == 401
        assert urlopen_status(fake.url + FakeAws.TOKEN, {}, "PUT") == 400  # TTL header required


def test_aws_terminate_notice_once_with_deadline():
    with FakeAws() as fake, running(AwsWatcher(fake.url, interval_s=FAST)) as got:
        assert polls(fake, FakeAws.ACTION, 2)
        fake.notice(action="terminate", in_s=120)
        assert wait_until(lambda: got.notices)
        n = len(fake.requests_to(FakeAws.ACTION))
        assert polls(fake, FakeAws.ACTION, n + 4)  # keeps polling, stays deduped
        assert len(got.notices) == 1
    notice = got.notices[0]
    assert (notice.kind, notice.source) == ("terminate", "aws")
    assert notice.deadline_s == pytest.approx(120, abs=2)
    assert "terminate" in notice.detail


def test_aws_stop_action_is_still_a_terminate_notice():
    with FakeAws() as fake, running(AwsWatcher(fake.url, interval_s=FAST)) as got:
        fake.notice(action="stop", in_s=60)
        assert wait_until(lambda: got.notices)
    assert got.notices[0].kind == "terminate"
    assert got.notices[0].deadline_s == pytest.approx(60, abs=2)
    assert "stop" in got.notices[0].detail


def test_aws_token_refreshed_after_401():
    with FakeAws() as fake, running(AwsWatcher(fake.url, interval_s=FAST)) as got:
        assert polls(fake, FakeAws.ACTION, 2)
        fake.expire_tokens()
        assert wait_until(lambda: len(fake.requests_to(FakeAws.TOKEN, "PUT")) >= 2)
        fake.notice(in_s=100)
        assert wait_until(lambda: got.notices)
    assert any(r.status == 401 for r in fake.requests)  # the expiry was seen...
    tokens = {r.headers["x-aws-ec2-metadata-token"] for r in fake.requests if r.method == "GET"}
    assert len(tokens) == 2  # ...and the new token used from then on
    assert got.notices[0].deadline_s == pytest.approx(100, abs=2)


def test_aws_token_renewed_before_expiry():
    watcher = AwsWatcher(interval_s=FAST, token_ttl_s=1)
    with FakeAws() as fake:
        watcher.base_url = fake.url
        with running(watcher):
            assert wait_until(lambda: len(fake.requests_to(FakeAws.TOKEN, "PUT")) >= 3, timeout_s=4)
    assert fake.requests_to(FakeAws.TOKEN)[0].headers["x-aws-ec2-metadata-token-ttl-seconds"] == "1"
    assert not [r for r in fake.requests if r.status == 401]  # renewed in time, never refused


def test_aws_rebalance_then_terminate_are_two_notices():
    with FakeAws() as fake, running(AwsWatcher(fake.url, interval_s=FAST)) as got:
        fake.rebalance()
        assert wait_until(lambda: got.notices)
        assert [(n.kind, n.source, n.deadline_s) for n in got.notices] == [("rebalance", "aws", None)]
        fake.notice(in_s=120)
        assert wait_until(lambda: len(got.notices) == 2)
        n = len(fake.requests_to(FakeAws.ACTION))
        assert polls(fake, FakeAws.ACTION, n + 3)
    assert [n.kind for n in got.notices] == ["rebalance", "terminate"]


def test_callback_error_does_not_stop_the_watch():
    calls = []

    def boom(notice: Notice) -> None:
        calls.append(notice)
        raise RuntimeError("caller bug")

    watcher = AwsWatcher(interval_s=FAST)
    with FakeAws() as fake:
        watcher.base_url = fake.url
        watcher.start(boom)
        try:
            fake.rebalance()
            assert wait_until(lambda: len(calls) == 1)
            fake.notice()
            assert wait_until(lambda: len(calls) == 2)
            assert watcher._thread.is_alive()
        finally:
            watcher.stop()
    assert [n.kind for n in calls] == ["rebalance", "terminate"]


# --- GCP ---------------------------------------------------------------------------


def test_gcp_fake_requires_the_header():
    with FakeGcp() as fake:
        assert urlopen_status(fake.url + FakeGcp.PREEMPTED, {}) == 403
        assert urlopen_status(fake.url + FakeGcp.PREEMPTED, {"Metadata-Flavor": "Google"}) == 200


def test_gcp_preempted_notice_once():
    with FakeGcp() as fake, running(GcpWatcher(fake.url, interval_s=FAST)) as got:
        assert polls(fake, FakeGcp.PREEMPTED)
        assert got.notices == []
        fake.preempt()
        assert wait_until(lambda: got.notices)
        n = len(fake.requests_to(FakeGcp.PREEMPTED))
        assert polls(fake, FakeGcp.PREEMPTED, n + 4)
    assert got.notices == [Notice("terminate", "gcp", 30.0, "instance/preempted is TRUE")]
    assert all(r.headers.get("metadata-flavor") == "Google" and r.status == 200 for r in fake.requests)


def test_gcp_ignores_answers_that_are_not_from_gce(caplog):
    caplog.set_level("WARNING", logger="spotbatch.preemption")
    with anything_goes(b"TRUE") as url:
        assert _kinds(watchers_for("auto", aws_url=unreachable_url(), gcp_url=url, azure_url=unreachable_url())) == [
            "SignalWatcher"
        ]
        with running(GcpWatcher(url, interval_s=FAST)) as got:
            assert wait_until(lambda: any("Metadata-Flavor" in r.message for r in caplog.records))
            time.sleep(0.2)
    assert got.notices == []
    assert sum("Metadata-Flavor" in r.message for r in caplog.records) == 1  # warned once, not per poll


# --- Azure -------------------------------------------------------------------------


def test_azure_fake_requires_header_and_api_version():
    with FakeAzure() as fake:
        events = fake.url + FakeAzure.EVENTS
        assert urlopen_status(events + "?api-version=2020-07-01", {}) == 400
        assert urlopen_status(events, {"Metadata": "true"}) == 400
        assert urlopen_status(events + "?api-version=2020-07-01", {"Metadata": "true"}) == 200


def test_azure_preempt_notice_once_and_ack_after_stop():
    watcher = AzureWatcher(interval_s=FAST)
    with FakeAzure() as fake:
        watcher.base_url = fake.url
        with running(watcher) as got:
            assert polls(fake, FakeAzure.EVENTS)
            assert got.notices == []
            event_id = fake.preempt(in_s=30)
            assert wait_until(lambda: got.notices)
            n = len(fake.requests_to(FakeAzure.EVENTS, "GET"))
            assert polls(fake, FakeAzure.EVENTS, n + 4)
            assert len(got.notices) == 1
            assert fake.acks == []  # no ack on sight: it would let Azure evict at once
        assert watcher.acknowledge() == []  # stop() already acked; never twice
    notice = got.notices[0]
    assert (notice.kind, notice.source) == ("terminate", "azure")
    assert notice.deadline_s == pytest.approx(30, abs=2)
    assert event_id in notice.detail
    assert fake.acks == [event_id]
    (post,) = fake.requests_to(FakeAzure.EVENTS, "POST")
    assert json.loads(post.body) == {"StartRequests": [{"EventId": event_id}]}
    assert post.headers["metadata"] == "true"
    assert post.query == {"api-version": "2020-07-01"}
    gets = [r for r in fake.requests if r.method == "GET"]
    assert all(r.headers["metadata"] == "true" and r.status == 200 for r in gets)


def test_azure_ignores_other_vms_and_other_event_types():
    with FakeAzure(vm_name="me") as fake, running(AzureWatcher(fake.url, interval_s=FAST)) as got:
        fake.preempt(resources=["someone-else"])
        fake.add_event("Freeze")
        n = len(fake.requests_to(FakeAzure.EVENTS, "GET"))
        assert polls(fake, FakeAzure.EVENTS, n + 4)
        assert got.notices == []
        mine = fake.preempt(resources=["someone-else", "ME"])  # names are case-insensitive
        assert wait_until(lambda: got.notices)
    assert len(got.notices) == 1 and mine in got.notices[0].detail
    assert fake.acks == [mine]
    assert fake.requests_to(FakeAzure.NAME)  # learned its own name from IMDS


def test_azure_terminate_event_and_missing_not_before():
    with FakeAzure() as fake, running(AzureWatcher(fake.url, interval_s=FAST)) as got:
        fake.add_event("Terminate", in_s=None)
        assert wait_until(lambda: got.notices)
    assert got.notices[0].kind == "terminate"
    assert got.notices[0].deadline_s == 30.0


# --- failures and stopping -----------------------------------------------------------


@pytest.mark.parametrize("cls", [AwsWatcher, GcpWatcher, AzureWatcher])
def test_unreachable_endpoint_no_crash_no_notice(cls, caplog):
    watcher = cls(unreachable_url(), interval_s=FAST, timeout_s=0.2)
    caplog.set_level("DEBUG", logger="spotbatch.preemption")
    with running(watcher) as got:
        assert wait_until(lambda: sum("unreachable" in r.message for r in caplog.records) >= 3)
        assert watcher._thread.is_alive()
    assert got.notices == []
    assert not watcher._thread.is_alive()


@pytest.mark.parametrize("cls", [AwsWatcher, GcpWatcher, AzureWatcher])
def test_stop_is_prompt_between_polls(cls):
    watcher = cls(unreachable_url(), interval_s=30.0)
    watcher.start(Collector())
    time.sleep(0.1)  # now sleeping out its 30 s interval
    began = time.monotonic()
    watcher.stop()
    assert time.monotonic() - began < 0.5
    assert not watcher._thread.is_alive()


def test_stop_is_bounded_with_a_request_in_flight():
    with HangingServer() as hang:
        watcher = GcpWatcher(hang.url, interval_s=FAST, timeout_s=5.0)
        got = Collector()
        watcher.start(got)
        time.sleep(0.2)  # now blocked in a GET that will not be answered
        began = time.monotonic()
        watcher.stop()
        assert time.monotonic() - began < 1.5
    assert got.notices == []


def test_no_callback_after_stop_returns():
    # The poll in flight when stop() is called sees TRUE, but stop() has returned.
    with FakeGcp() as fake:
        watcher = GcpWatcher(fake.url, interval_s=FAST)
        with running(watcher) as got:
            assert polls(fake, FakeGcp.PREEMPTED, 2)
            fake.delay_s = 0.4
            fake.preempt()
            time.sleep(0.1)  # a GET is now waiting for its answer
        assert wait_until(lambda: fake.requests_to(FakeGcp.PREEMPTED)[-1].status == 200 and not watcher._thread.is_alive())
    assert fake.requests_to(FakeGcp.PREEMPTED)[-1].headers  # the TRUE answer was served...
    assert got.notices == []  # ...and not delivered


# --- signals -------------------------------------------------------------------------


def test_signal_watcher_notices_twice_and_restores_handlers():
    def previous(_signum, _frame):
        pass

    old = signal.signal(signal.SIGTERM, previous)
    old_int = signal.getsignal(signal.SIGINT)
    try:
        watcher = SignalWatcher()
        got = Collector()
        watcher.start(got)
        try:
            assert signal.getsignal(signal.SIGTERM) is not previous
            os.kill(os.getpid(), signal.SIGTERM)
            assert wait_until(lambda: len(got.notices) == 1)
            os.kill(os.getpid(), signal.SIGTERM)
            assert wait_until(lambda: len(got.notices) == 2)
        finally:
            watcher.stop()
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is old_int
    finally:
        signal.signal(signal.SIGTERM, old)
    assert got.notices == [
        Notice("terminate", "signal", None, "SIGTERM"),
        Notice("terminate", "signal", None, "SIGTERM (again)"),
    ]


def test_signal_watcher_needs_the_main_thread():
    errors = []

    def start_off_main():
        try:
            SignalWatcher().start(Collector())
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=start_off_main)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


# --- watchers_for ----------------------------------------------------------------------


def _kinds(watchers) -> list[str]:
    return [type(w).__name__ for w in watchers]


def test_watchers_for_auto_keeps_only_answering_endpoints(monkeypatch):
    with FakeAws() as aws, FakeAzure() as azure:
        monkeypatch.setenv("SPOTBATCH_AWS_METADATA_URL", aws.url)
        monkeypatch.setenv("SPOTBATCH_GCP_METADATA_URL", unreachable_url())
        monkeypatch.setenv("SPOTBATCH_AZURE_METADATA_URL", azure.url)
        watchers = watchers_for("auto", interval_s=FAST)
    assert _kinds(watchers) == ["AwsWatcher", "AzureWatcher", "SignalWatcher"]
    assert [w.base_url for w in watchers[:2]] == [aws.url, azure.url]
    assert all(w.interval_s == FAST for w in watchers[:2])


def test_watchers_for_auto_wants_the_right_provider(monkeypatch):
    # AWS and Azure share 169.254.169.254: an answer from the wrong one must not count.
    with FakeAws() as aws, FakeGcp() as gcp:
        monkeypatch.setenv("SPOTBATCH_AWS_METADATA_URL", gcp.url)
        monkeypatch.setenv("SPOTBATCH_GCP_METADATA_URL", gcp.url)
        monkeypatch.setenv("SPOTBATCH_AZURE_METADATA_URL", aws.url)
        assert _kinds(watchers_for("auto")) == ["GcpWatcher", "SignalWatcher"]


def test_watchers_for_auto_is_bounded_when_endpoints_hang(monkeypatch):
    with HangingServer() as hang:
        for var in ("SPOTBATCH_AWS_METADATA_URL", "SPOTBATCH_GCP_METADATA_URL", "SPOTBATCH_AZURE_METADATA_URL"):
            monkeypatch.setenv(var, hang.url)
        began = time.monotonic()
        watchers = watchers_for("auto")
        assert time.monotonic() - began < 1.0
    assert _kinds(watchers) == ["SignalWatcher"]


def test_watchers_for_auto_is_bounded_when_a_probe_never_returns(monkeypatch):
    # getaddrinfo ignores socket timeouts; a slow DNS answer must not stall start-up.
    monkeypatch.setattr(AwsWatcher, "probe", classmethod(lambda cls, url, timeout_s: time.sleep(3) or True))
    with FakeGcp() as gcp:
        began = time.monotonic()
        watchers = watchers_for("auto", aws_url="http://x", gcp_url=gcp.url, azure_url=unreachable_url())
        assert time.monotonic() - began < 1.0
    assert _kinds(watchers) == ["GcpWatcher", "SignalWatcher"]


def test_watchers_for_named_sources(monkeypatch):
    monkeypatch.delenv("SPOTBATCH_AWS_METADATA_URL", raising=False)
    (aws, sig) = watchers_for("aws")  # named: no probe, polled even if absent now
    assert isinstance(aws, AwsWatcher) and aws.base_url == "http://169.254.169.254"
    assert isinstance(sig, SignalWatcher)
    assert _kinds(watchers_for("GCP", gcp_url="http://x:1")) == ["GcpWatcher", "SignalWatcher"]
    assert watchers_for("gcp", gcp_url="http://x:1")[0].base_url == "http://x:1"
    assert _kinds(watchers_for("azure")) == ["AzureWatcher", "SignalWatcher"]
    assert _kinds(watchers_for("signal")) == ["SignalWatcher"]
    assert watchers_for("none") == []


def test_watchers_for_argument_beats_env(monkeypatch):
    monkeypatch.setenv("SPOTBATCH_AZURE_METADATA_URL", "http://from-env:1")
    assert watchers_for("azure")[0].base_url == "http://from-env:1"
    assert watchers_for("azure", azure_url="http://from-arg:2")[0].base_url == "http://from-arg:2"


def test_watchers_for_bad_source():
    with pytest.raises(ValueError, match="auto, aws, gcp, azure, signal, none"):
        watchers_for("ibm")
