"""The hybrid split end to end: the KEDA external scaler over real gRPC, with the
splitter `spotbatch scaler serve --pools` builds (live_splitter): spot readiness from an
HTTP server answering like the Kubernetes API for the spot Deployment (read by the
real `kubernetes` client), interruption rates from usage records on the embedded broker.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from spotbatch.kafka_admin import ensure_topics
from spotbatch.scaler.proto import externalscaler_pb2 as pb
from spotbatch.scaler.proto import externalscaler_pb2_grpc as pb_grpc
from spotbatch.scaler.service import LagSource, serve
from spotbatch.scheduler.pools import PoolConfig, config_to_metadata
from spotbatch.scheduler.splitter import live_splitter
from tests.integration.helpers import new_group

pytestmark = pytest.mark.integration

DEPLOYMENT = "/apis/apps/v1/namespaces/spotbatch/deployments/spotbatch-worker-spot"


class FakeDeployments:
    """GET of the spot Deployment, with its replicas and readyReplicas settable."""

    def __init__(self) -> None:
        self.requested, self.ready, self.gets = 3, 3, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                if self.path.split("?")[0] != DEPLOYMENT:
                    self.send_error(404)
                    return
                fake.gets += 1
                body = json.dumps(fake.deployment()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def deployment(self) -> dict:
        labels = {"app.kubernetes.io/name": "spotbatch-worker", "spotbatch.dev/pool": "spot"}
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "spotbatch-worker-spot", "namespace": "spotbatch"},
                "spec": {"replicas": self.requested, "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels},
                                      "spec": {"containers": [{"name": "worker", "image": "spotbatch:test"}]}}},
                "status": {"replicas": self.requested, "readyReplicas": self.ready}}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def deployments():
    fake = FakeDeployments()
    yield fake
    fake.close()


@pytest.fixture
def scaler(kafka_bootstrap, deployments, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "c", "cluster": {"server": deployments.url}}],
        "users": [{"name": "u", "user": {"token": "x"}}],
        "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}]}))
    usage_topic = f"usage-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, {usage_topic: 1})
    splitter = live_splitter(usage_topic=usage_topic, default_bootstrap=kafka_bootstrap, kubeconfig=str(kubeconfig),
                             state_cache_s=0.0)
    server = serve(port=0, metrics_port=None, host="127.0.0.1", source=LagSource(cache_s=0.0, splitter=splitter))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.ExternalScalerStub(channel), usage_topic
    channel.close()
    server.stop(grace_s=0)


def lagging_group(bootstrap: str, topic: str, records: int) -> str:
    """A group `records` behind on partition 0 (desired = ceil(records / 10))."""
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(records):
        producer.send(topic, f"r{i}".encode(), partition=0)
    producer.flush(timeout=30)
    producer.close()
    group = new_group()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(0, "", -1) for p in range(4)})
    consumer.close()
    return group


def shares(stub, meta: dict[str, str]) -> tuple[float, float, bool]:
    def value(pool: str) -> float:
        ref = pb.ScaledObjectRef(name=f"w-{pool}", namespace="spotbatch", scalerMetadata={**meta, "pool": pool})
        return stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref)).metricValues[0].metricValueFloat
    spot_ref = pb.ScaledObjectRef(name="w-spot", namespace="spotbatch", scalerMetadata={**meta, "pool": "spot"})
    return value("on-demand"), value("spot"), stub.IsActive(spot_ref).result


def meta_for(bootstrap: str, topic: str, group: str) -> dict[str, str]:
    pools = PoolConfig(baseline=1, spot_max=10, fallback_cap=2, unready_grace_s=0, recover_s=3600)
    return {**config_to_metadata(pools), "bootstrapServers": bootstrap, "consumerGroup": group, "topic": topic,
            "lagThreshold": "10"}


def test_split_and_fallback_when_spot_is_unready(kafka_bootstrap, topic, scaler, deployments):
    stub, _ = scaler
    meta = meta_for(kafka_bootstrap, topic, lagging_group(kafka_bootstrap, topic, 35))  # 4 replicas wanted
    assert shares(stub, meta) == (10.0, 30.0, True)  # baseline 1 on-demand + 3 spot, x lagThreshold 10
    deployments.ready = 0  # spot capacity gone: requested 3, ready 0
    assert shares(stub, meta) == (30.0, 30.0, True)  # on-demand covers 2 of the gap (the cap)
    deployments.ready = 3  # back, but the hand-back waits recover_s
    assert shares(stub, meta)[0] == 30.0
    assert deployments.gets >= 3


def test_interruption_storm_in_the_usage_ledger_falls_back(kafka_bootstrap, topic, scaler, deployments):
    import time

    stub, usage_topic = scaler
    now = time.time()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(3):  # 3 spot replica-hours, 6 interruptions: 2 per replica-hour, over the 0.1 limit
        rec = {"v": 1, "kind": "usage", "record_id": f"s{i}-1", "worker": f"s{i}", "pool": "spot",
               "instance_type": "g5.xlarge", "gpus": 1, "start": now - 3600, "end": now - 5, "seconds_alive": 3600.0,
               "seconds_busy": 3000.0, "rows": 100, "jobs": 1, "interruptions": 2, "rows_recomputed": 10,
               "final": True, "at": now}
        producer.send(usage_topic, key=rec["worker"].encode(), value=json.dumps(rec).encode())
    producer.flush(timeout=30)
    producer.close()
    meta = meta_for(kafka_bootstrap, topic, lagging_group(kafka_bootstrap, topic, 35))
    assert shares(stub, meta) == (30.0, 30.0, True)  # spot all ready, but flapping: on-demand covers (cap 2)
