"""`spotbatch scheduler apply` against an HTTP server that answers like the Kubernetes
API server for the ScaledObjects and records every request the real `kubernetes`
client makes. No API server runs on these machines; the ScaledObjects served are the
ones `kubectl kustomize k8s/overlays/aws-hybrid` renders.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from spotbatch.scheduler.pools import METADATA_KEYS
from tests.k8s_render import find

pytestmark = pytest.mark.integration

PREFIX = "/apis/keda.sh/v1alpha1/namespaces/spotbatch/scaledobjects/"
NAMES = ("spotbatch-worker-ondemand", "spotbatch-worker-spot")


def merge_patch(target, patch):
    """RFC 7386, what the API server does with application/merge-patch+json."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeApiServer:
    def __init__(self, objects: dict[str, dict]) -> None:
        self.objects = objects
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _name(self) -> str | None:
                path = self.path.split("?")[0]
                return path[len(PREFIX):] if path.startswith(PREFIX) else None

            def do_GET(self):  # noqa: N802
                name = self._name()
                server.requests.append({"method": "GET", "path": self.path, "auth": self.headers.get("Authorization")})
                if name in server.objects:
                    self._send(200, server.objects[name])
                else:
                    self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                     "code": 404, "message": f"scaledobjects.keda.sh \"{name}\" not found"})

            def do_PATCH(self):  # noqa: N802
                name = self._name()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"method": "PATCH", "path": self.path, "body": body,
                                        "content_type": self.headers.get("Content-Type")})
                server.objects[name] = merge_patch(server.objects[name], body)
                self._send(200, server.objects[name])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def patches(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "PATCH"]


@pytest.fixture
def rendered():
    objs = {name: find("aws-hybrid", "ScaledObject", name) for name in NAMES}
    assert all(objs.values()), "k8s/overlays/aws-hybrid must render both ScaledObjects"
    return copy.deepcopy(objs)


@pytest.fixture
def api(rendered):
    with FakeApiServer(rendered) as server:
        yield server


def kubeconfig(tmp_path, url: str) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "tester", "namespace": "spotbatch"}}],
    }))
    return str(path)


def run_apply(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spotbatch", "scheduler", "apply", *args],
                          capture_output=True, text=True, timeout=60)


def write_plan(tmp_path, **setting) -> str:
    rec = {"baseline": 3, "on_demand_above_base_pct": 0.0, "spot_max": 30, "fallback_cap": 8, "unready_grace_s": 240.0,
           "interruption_rate_max_per_h": 0.1, "recover_s": 900.0, "max_replicas": 40, "lag_threshold": 25, "cost": 1.0,
           **setting}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"kind": "spotbatch.plan", "v": 1, "recommended": rec}))
    return str(path)


def test_dry_run_prints_the_diff_and_patches_nothing(tmp_path, api):
    before = copy.deepcopy(api.objects)
    proc = run_apply("--plan", write_plan(tmp_path), "--kubeconfig", kubeconfig(tmp_path, api.url))
    assert proc.returncode == 0, proc.stderr
    assert "-  minReplicaCount: 1\n+  maxReplicaCount: 11\n+  minReplicaCount: 3\n" in proc.stdout
    assert "-  lagThreshold: '10'" not in proc.stdout and "+      lagThreshold: '25'" in proc.stdout
    assert "+      fallbackCap: '8'" in proc.stdout and "dry run" in proc.stderr
    assert api.patches() == []
    gets = [r["path"] for r in api.requests if r["method"] == "GET"]
    assert gets == [PREFIX + n for n in NAMES]
    assert all(r["auth"] == "Bearer t0ken" for r in api.requests)
    assert api.objects == before


def test_yes_patches_both_scaled_objects(tmp_path, api, rendered):
    cfg = kubeconfig(tmp_path, api.url)
    proc = run_apply("--plan", write_plan(tmp_path), "--kubeconfig", cfg, "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dry_run"] is False and sorted(report["patched"]) == sorted(NAMES)
    patches = {r["path"][len(PREFIX):]: r for r in api.patches()}
    assert set(patches) == set(NAMES)
    assert all(r["content_type"] == "application/merge-patch+json" for r in patches.values())
    od = patches["spotbatch-worker-ondemand"]["body"]["spec"]
    spot = patches["spotbatch-worker-spot"]["body"]["spec"]
    assert (od["minReplicaCount"], od["maxReplicaCount"]) == (3, 11)  # baseline + fallback cap
    assert (spot["minReplicaCount"], spot["maxReplicaCount"]) == (0, 30)
    for name, spec in (("spotbatch-worker-ondemand", od), ("spotbatch-worker-spot", spot)):
        original = rendered[name]["spec"]["triggers"][0]["metadata"]
        meta = spec["triggers"][0]["metadata"]
        assert {k: meta[k] for k in original if k != "lagThreshold"} == {k: v for k, v in original.items() if k != "lagThreshold"}
        assert meta["lagThreshold"] == "25"  # the plan was simulated with it
        assert set(METADATA_KEYS.values()) <= set(meta)
        assert (meta["baseline"], meta["fallbackCap"], meta["recoverSeconds"]) == ("3", "8", "900")
        assert api.objects[name]["spec"]["triggers"][0]["metadata"]["baseline"] == "3"
    # applying the same setting again changes nothing
    api.requests.clear()
    again = run_apply("--plan", write_plan(tmp_path), "--kubeconfig", cfg, "--yes")
    assert again.returncode == 0, again.stderr
    assert api.patches() == [] and "up to date" in again.stdout


def test_flags_instead_of_a_plan(tmp_path, api):
    proc = run_apply("--baseline", "1", "--max-replicas", "10", "--kubeconfig", kubeconfig(tmp_path, api.url), "--yes")
    assert proc.returncode == 0, proc.stderr
    spot = api.objects["spotbatch-worker-spot"]["spec"]
    assert (spot["maxReplicaCount"], spot["triggers"][0]["metadata"]["fallbackCap"]) == (9, "0")
    assert spot["triggers"][0]["metadata"]["lagThreshold"] == "10"  # not given: left as it was


def test_missing_scaled_object_is_a_one_line_error(tmp_path, rendered):
    del rendered["spotbatch-worker-spot"]
    with FakeApiServer(rendered) as api:
        proc = run_apply("--plan", write_plan(tmp_path), "--kubeconfig", kubeconfig(tmp_path, api.url), "--yes")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "HTTP 404" in lines[0] and "hybrid" in lines[0]
    assert api.patches() == []  # nothing is patched when one object is missing


def test_bad_input(tmp_path):
    proc = run_apply("--plan", str(tmp_path / "nope.json"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_apply("--baseline", "2")
    assert proc.returncode == 2 and "--max-replicas" in proc.stderr
    proc = run_apply("--baseline", "2", "--max-replicas", "4", "--kubeconfig", kubeconfig(tmp_path, "http://127.0.0.1:9"))
    assert proc.returncode == 1 and "kubeconfig" in proc.stderr
