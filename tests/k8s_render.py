"""Render the kustomize overlays under k8s/ and look objects up in the result.

Shared by tests/unit/test_manifests.py and tests/unit/test_images.py. Rendering uses the
real `kubectl kustomize` (offline), once per overlay per test session.
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

__all__ = [
    "REPO", "K8S", "KEDA_REF", "PROMETHEUS_OPERATOR_REF", "MONITORING", "OVERLAYS", "HYBRID_OVERLAYS", "cloud_of",
    "render", "render_dir", "strict_schema", "objects", "find", "config_data", "pod_containers", "container_port",
]

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KEDA_REF = REPO.parent / "shared" / "ref" / "keda"
PROMETHEUS_OPERATOR_REF = REPO.parent / "shared" / "ref" / "prometheus-operator"
MONITORING = K8S / "monitoring"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
HYBRID_OVERLAYS = [o for o in OVERLAYS if o.endswith("-hybrid")]

Obj = dict[str, Any]


def cloud_of(overlay: str) -> str:
    return overlay.removesuffix("-hybrid")


@functools.lru_cache(maxsize=None)
def render(overlay: str) -> tuple[Obj, ...]:
    """The objects `kubectl kustomize k8s/overlays/<overlay>` prints (cached)."""
    return render_dir(K8S / "overlays" / overlay)


@functools.lru_cache(maxsize=None)
def render_dir(folder: Path) -> tuple[Obj, ...]:
    """The objects `kubectl kustomize FOLDER` prints (cached)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render k8s/ (kustomize runs offline)"
    proc = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {folder} failed: {proc.stderr.strip()}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def strict_schema(schema: dict) -> dict:
    """A CRD's openAPIV3Schema with unknown fields rejected: the API server would silently
    prune them (a typo'd field must fail in tests, not vanish in the cluster)."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_validator(ref: Path, crd_file: str, hint: str):
    """(apiVersion, strict Draft 7 validator) of a CRD's storage version, read from the
    shared reference folder ``ref``; the test skips, naming ``hint``, where it is absent
    (the folder lives beside the repo and is never copied in)."""
    import jsonschema
    import pytest

    if not ref.is_dir():
        pytest.skip(f"CRDs not found at {ref}; {hint}")
    crd = yaml.safe_load((ref / crd_file).read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    return f"{crd['spec']['group']}/{version['name']}", jsonschema.Draft7Validator(schema)


def schema_errors(validator, obj: Obj) -> list[str]:
    """Every schema violation of ``obj``, as "path: message"."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def debian_tool(name: str) -> str:
    """The path of a binary from Debian's prometheus package; skips (fails where
    SPOTBATCH_REQUIRE_PROMETHEUS is set, as in CI) when it is not installed."""
    import os

    import pytest

    tool = shutil.which(name)
    if tool is None:
        (pytest.fail if os.environ.get("SPOTBATCH_REQUIRE_PROMETHEUS") else pytest.skip)(
            f"{name} not found: `make test` installs Debian's prometheus package "
            "(apt-get install -y prometheus, as root)")
    return tool


def objects(overlay: str, kind: str) -> list[Obj]:
    return [o for o in render(overlay) if o["kind"] == kind]


def find(overlay: str, kind: str, name: str, namespace: str | None = None) -> Obj | None:
    for o in objects(overlay, kind):
        meta = o["metadata"]
        if meta["name"] == name and (namespace is None or meta.get("namespace") == namespace):
            return o
    return None


def config_data(overlay: str) -> dict[str, str]:
    """The spotbatch-config ConfigMap's data (the SPOTBATCH_* env of every pod)."""
    cm = find(overlay, "ConfigMap", "spotbatch-config")
    assert cm is not None, f"{overlay}: no ConfigMap spotbatch-config"
    return cm["data"]


def pod_containers(deployment: Obj) -> Iterator[Obj]:
    yield from deployment["spec"]["template"]["spec"]["containers"]


def container_port(container: Obj, port: int | str) -> int | None:
    """Resolve a probe/Service port (number or name) to the container's port number."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return None
