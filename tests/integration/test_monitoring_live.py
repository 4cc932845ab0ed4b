"""A real Prometheus (Debian's `prometheus` package) scraping a real worker process and a
real scaler process on loopback, loaded with the PrometheusRule's alerts: every dashboard
query and every alert expression parses and returns series, and every rule evaluates.

The kube_* series some alerts combine with spotbatch's own (HPA replicas, Deployment
readiness, pod restarts) come from kube-state-metrics in a cluster; here a static
exposition of those names, shaped as kube-state-metrics writes them, stands in for it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
import yaml

from spotbatch.scaler.proto import externalscaler_pb2 as pb
from spotbatch.scaler.proto import externalscaler_pb2_grpc as pb_grpc
from tests.integration.helpers import (
    REPO_ROOT, ensure_side_topics, free_port, make_jobs, new_group, publish, send_raw, spawn_worker, statuses,
    wait_until,
)
from tests.k8s_render import debian_tool
from tests.unit.test_monitoring import KUBE_STATE_METRICS, alerts, dashboard, dashboard_exprs, write_rule_files

pytestmark = pytest.mark.integration

KSM_EXPOSITION = """\
# TYPE kube_horizontalpodautoscaler_status_current_replicas gauge
kube_horizontalpodautoscaler_status_current_replicas{namespace="spotbatch",horizontalpodautoscaler="keda-hpa-spotbatch-worker-spot"} 1
kube_horizontalpodautoscaler_status_current_replicas{namespace="spotbatch",horizontalpodautoscaler="keda-hpa-spotbatch-worker-ondemand"} 1
# TYPE kube_horizontalpodautoscaler_spec_max_replicas gauge
kube_horizontalpodautoscaler_spec_max_replicas{namespace="spotbatch",horizontalpodautoscaler="keda-hpa-spotbatch-worker-spot"} 20
kube_horizontalpodautoscaler_spec_max_replicas{namespace="spotbatch",horizontalpodautoscaler="keda-hpa-spotbatch-worker-ondemand"} 8
# TYPE kube_horizontalpodautoscaler_spec_min_replicas gauge
kube_horizontalpodautoscaler_spec_min_replicas{namespace="spotbatch",horizontalpodautoscaler="keda-hpa-spotbatch-worker-spot"} 0
kube_horizontalpodautoscaler_spec_min_replicas{namespace="spotbatch",horizontalpodautoscaler="keda-hpa-spotbatch-worker-ondemand"} 1
# TYPE kube_horizontalpodautoscaler_status_desired_replicas gauge
kube_horizontalpodautoscaler_status_desired_replicas{namespace="spotbatch",horizontalpodautoscaler="keda-hpa-spotbatch-worker-spot"} 1
kube_horizontalpodautoscaler_status_desired_replicas{namespace="spotbatch",horizontalpodautoscaler="keda-hpa-spotbatch-worker-ondemand"} 1
# TYPE kube_deployment_spec_replicas gauge
kube_deployment_spec_replicas{namespace="spotbatch",deployment="spotbatch-worker-spot"} 1
# TYPE kube_deployment_status_replicas_ready gauge
kube_deployment_status_replicas_ready{namespace="spotbatch",deployment="spotbatch-worker-spot"} 1
# TYPE kube_pod_status_ready gauge
kube_pod_status_ready{namespace="spotbatch",pod="spotbatch-worker-spot-0",uid="u0",condition="true"} 1
kube_pod_status_ready{namespace="spotbatch",pod="spotbatch-worker-spot-0",uid="u0",condition="false"} 0
# TYPE kube_pod_container_status_restarts_total counter
kube_pod_container_status_restarts_total{namespace="spotbatch",pod="spotbatch-worker-spot-0",uid="u0",container="worker"} 0
"""


def _prometheus_bin() -> str:
    return debian_tool("prometheus")


def _serve_ksm() -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = KSM_EXPOSITION.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _get(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400 bad_data: a parse error
        return json.loads(exc.read())


class Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> dict:
        return _get(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))

    def rules(self) -> list[dict]:
        return [r for g in _get(f"{self.base}/api/v1/rules")["data"]["groups"] for r in g["rules"]]

    def series(self, expr: str) -> list:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr!r}: {answer.get('error')}"
        return answer["data"]["result"]


def _dashboard_query(expr: str) -> str:
    """A panel's query as Grafana sends it: variables replaced by their defaults."""
    values = {v["name"]: v.get("current", {}).get("value") for v in dashboard()["templating"]["list"]}
    expr = expr.replace("$__rate_interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", lambda m: str(values[m.group(1)]), expr)


def _selectors(expr: str) -> list[str]:
    """Each metric selector of an expression with its label matchers (`name{...}`)."""
    return [m.group(0) for m in re.finditer(r"\b(spotbatch_[a-z_]+|kube_[a-z_]+|up)\b(\{[^{}]*\})?", expr)
            if not expr[m.end():].lstrip().startswith("(")]


@pytest.fixture
def stack(kafka_bootstrap, tmp_path):
    """Broker + a worker (tiny model) that has done jobs and a dead letter + a scaler that
    has answered KEDA's calls + Prometheus scraping both every second."""
    topic, group = f"mon-{new_group()}", new_group()
    ensure_side_topics(kafka_bootstrap, topic, 4)
    worker_port, scaler_grpc, scaler_http, prom_port = free_port(), free_port(), free_port(), free_port()
    worker = spawn_worker(kafka_bootstrap, topic, group, tmp_path / "out", tmp_path, burst=False,
                          args=["--metrics-port", str(worker_port)])
    scaler = subprocess.Popen(
        [sys.executable, "-m", "spotbatch", "scaler", "serve", "--host", "127.0.0.1", "--port", str(scaler_grpc),
         "--metrics-port", str(scaler_http), "--bootstrap", kafka_bootstrap],
        cwd=REPO_ROOT, stdout=open(tmp_path / "scaler.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    ksm = _serve_ksm()
    write_rule_files(tmp_path)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "spotbatch-rules.yaml")],
        "scrape_configs": [
            {"job_name": "spotbatch-worker", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"], "labels": {
                "namespace": "spotbatch", "pod": "spotbatch-worker-spot-0", "pool": "spot", "model": "tiny"}}]},
            {"job_name": "spotbatch-scaler", "static_configs": [{"targets": [f"127.0.0.1:{scaler_http}"], "labels": {
                "namespace": "spotbatch", "pod": "spotbatch-scaler-0"}}]},
            {"job_name": "kube-state-metrics", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{ksm.server_port}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen(
        [_prometheus_bin(), f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        publish(kafka_bootstrap, topic, make_jobs(6, 5, prefix="mon"))
        send_raw(kafka_bootstrap, topic, [(b"bad", b"{not json")])
        wait_until(lambda: len(statuses(kafka_bootstrap, topic)) >= 7, 90, "7 job statuses", workers=[worker])
        channel = grpc.insecure_channel(f"127.0.0.1:{scaler_grpc}")
        stub = pb_grpc.ExternalScalerStub(channel)
        ref = pb.ScaledObjectRef(name="spotbatch-worker-spot", namespace="spotbatch",
                                 scalerMetadata={"consumerGroup": group, "topic": topic, "lagThreshold": "10"})
        wait_until(lambda: _grpc_ok(stub, ref), 30, "the scaler to answer")
        stub.GetMetricSpec(ref)
        stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref))
        stub.IsActive(ref)
        with pytest.raises(grpc.RpcError):  # one refused call: a non-OK code for the error-rate alert
            stub.IsActive(pb.ScaledObjectRef(scalerMetadata={"topic": topic}))
        channel.close()
        client = Prom(prom_port)
        wait_until(lambda: _ready(client), 30, "Prometheus to be ready")
        yield client, tmp_path
    finally:
        for proc in (prom, scaler):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        worker.kill()
        ksm.shutdown()


def _grpc_ok(stub, ref) -> bool:
    try:
        stub.GetMetricSpec(ref)
        return True
    except grpc.RpcError:
        return False


def _ready(client: Prom) -> bool:
    try:
        with urllib.request.urlopen(f"{client.base}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_dashboard_and_alerts_return_series_from_a_real_worker_and_scaler(stack):
    client, tmp_path = stack
    exprs = [(t, _dashboard_query(e)) for t, e in dashboard_exprs()]
    # Every dashboard query returns series once two scrapes (1 s apart) have seen the work.
    wait_until(lambda: all(client.series(e) for _, e in exprs), 45,
               "every dashboard query to return series: "
               + ", ".join(t for t, e in exprs if not client.series(e)))
    for title, expr in exprs:
        assert client.series(expr), f"panel {title!r} returns nothing: {expr}"
    # The jobs and the dead letter are there, with the labels the panels group by.
    ok = client.series('sum by (pool, model, status) (spotbatch_jobs_total{job="spotbatch-worker"})')
    assert {(s["metric"]["pool"], s["metric"]["model"], s["metric"]["status"]) for s in ok} == {
        ("spot", "tiny", "ok"), ("spot", "tiny", "failed")}
    codes = client.series("sum by (code) (spotbatch_job_errors_total)")
    assert {s["metric"]["code"] for s in codes} == {"malformed_json"}

    for a in alerts():
        answer = client.query(a["expr"])
        assert answer["status"] == "success", f"{a['alert']}: {answer.get('error')}"
        for selector in _selectors(a["expr"]):
            assert client.series(f"count({selector})"), f"{a['alert']}: {selector} selects no series"

    # Prometheus itself loaded and evaluated every rule without an error.
    def evaluated() -> list[dict]:
        rules = client.rules()
        done = len(rules) == len(alerts()) and all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules if done else []

    rules = wait_until(evaluated, 20, "every rule to be evaluated")
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert KUBE_STATE_METRICS  # the stand-in serves exactly the names the unit test allows
    assert {m.split("{")[0].split(" ")[0] for m in KSM_EXPOSITION.splitlines() if m and not m.startswith("#")} \
        == KUBE_STATE_METRICS
