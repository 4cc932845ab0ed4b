"""The kustomize manifests under k8s/: every overlay renders, every object validates
(core kinds with kubernetes-validate, KEDA kinds against the CRDs in ../shared/ref/keda),
and the objects agree with each other, with the settings and with FACTS.md.
"""

from __future__ import annotations

import copy
import functools
import os
import re

import kubernetes_validate
import pytest

from spotbatch.config import ConfigError, load_settings
from tests.k8s_render import (
    crd_validator,
    schema_errors,
    HYBRID_OVERLAYS, KEDA_REF, OVERLAYS, cloud_of, config_data, container_port, find, objects,
    pod_containers, render,
)

K8S_VERSION = "1.33.0"  # a version kubernetes-validate ships schemas for
DRAIN_MARGIN_S = 10  # after the drain: commit, interruption record, leave the group
WORKERS = {"spot": "spotbatch-worker-spot", "on-demand": "spotbatch-worker-ondemand"}
SCALER = "spotbatch-scaler"
NAMESPACE = "spotbatch"
KEDA_NAMESPACE = "keda"
KEDA_CRDS = {"ScaledObject": "keda.sh_scaledobjects.yaml",
             "TriggerAuthentication": "keda.sh_triggerauthentications.yaml"}

overlays = pytest.mark.parametrize("overlay", OVERLAYS)
hybrid_overlays = pytest.mark.parametrize("overlay", HYBRID_OVERLAYS)
plain_overlays = pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o not in HYBRID_OVERLAYS])


def test_every_cloud_has_a_plain_and_a_hybrid_overlay():
    assert set(OVERLAYS) == {"aws", "gke", "azure", "aws-hybrid", "gke-hybrid", "azure-hybrid"}


# --- schemas -------------------------------------------------------------------------

def _is_keda(obj: dict) -> bool:
    return obj["apiVersion"].startswith("keda.sh/")


@overlays
def test_core_objects_validate_strictly(overlay):
    core = [o for o in render(overlay) if not _is_keda(o)]
    assert {"Deployment", "Service", "ConfigMap", "Secret", "NetworkPolicy", "PodDisruptionBudget",
            "Role", "RoleBinding", "ServiceAccount", "Namespace"} <= {o["kind"] for o in core}
    for obj in core:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_core_validation_rejects_an_unknown_field():
    deployment = copy.deepcopy(find("aws", "Deployment", WORKERS["spot"]))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45  # typo'd field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@functools.lru_cache(maxsize=None)
def _keda_validator(kind: str):
    return crd_validator(KEDA_REF, KEDA_CRDS[kind], "put KEDA's CRD YAMLs there (../shared/ref/keda) "
                         "to validate ScaledObject/TriggerAuthentication")


@overlays
def test_keda_objects_validate_against_the_crds(overlay):
    keda = [o for o in render(overlay) if _is_keda(o)]
    assert sorted(o["kind"] for o in keda) == ["ScaledObject", "ScaledObject", "TriggerAuthentication"]
    for obj in keda:
        api_version, validator = _keda_validator(obj["kind"])
        assert obj["apiVersion"] == api_version
        errors = schema_errors(validator, obj)
        assert not errors, f"{overlay} {obj['kind']}/{obj['metadata']['name']}: {errors}"


def test_keda_validation_rejects_a_misspelt_field():
    _, validator = _keda_validator("ScaledObject")
    so = copy.deepcopy(find("aws", "ScaledObject", WORKERS["spot"]))
    so["spec"]["minReplicas"] = 0  # KEDA's field is minReplicaCount
    assert not validator.is_valid(so)


@overlays
def test_everything_lives_in_the_spotbatch_namespace(overlay):
    for obj in render(overlay):
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]


# --- workloads -----------------------------------------------------------------------

def _deployment(overlay: str, name: str) -> dict:
    dep = find(overlay, "Deployment", name)
    assert dep is not None, f"{overlay}: Deployment {name} missing"
    return dep


def _pod_labels(dep: dict) -> dict:
    return dep["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a label set."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(_expression_holds(e, labels) for e in selector.get("matchExpressions", []))


def _expression_holds(expr: dict, labels: dict) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values", [])
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    raise AssertionError(f"operator {op} not handled")


@overlays
def test_worker_pools_are_labelled_and_selected_as_agreed(overlay):
    for pool, name in WORKERS.items():
        dep = _deployment(overlay, name)
        for labels in (dep["metadata"]["labels"], _pod_labels(dep)):
            assert labels["app.kubernetes.io/name"] == "spotbatch-worker"
            assert labels["spotbatch.dev/pool"] == pool
        env = _env(dep)
        assert env["SPOTBATCH_POOL"] == pool


@overlays
def test_selectors_match_pod_labels(overlay):
    deployments = objects(overlay, "Deployment")
    pods = {d["metadata"]["name"]: _pod_labels(d) for d in deployments}
    for dep in deployments:
        assert _selects(dep["spec"]["selector"], _pod_labels(dep)), dep["metadata"]["name"]
        for other in deployments:  # selectors must not overlap: each owns its own pods
            if other is not dep:
                assert not _selects(dep["spec"]["selector"], _pod_labels(other))
        for spread in dep["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            assert _selects(spread["labelSelector"], _pod_labels(dep))
    for pdb in objects(overlay, "PodDisruptionBudget"):
        selected = [n for n, labels in pods.items() if _selects(pdb["spec"]["selector"], labels)]
        assert selected == [pdb["metadata"]["name"]], f"PDB {pdb['metadata']['name']} selects {selected}"
    for svc in objects(overlay, "Service"):
        selected = [n for n, labels in pods.items() if _selects({"matchLabels": svc["spec"]["selector"]}, labels)]
        assert selected == [svc["metadata"]["name"]]
    for policy in objects(overlay, "NetworkPolicy"):
        assert any(_selects(policy["spec"]["podSelector"], labels) for labels in pods.values())


def _env(dep: dict) -> dict[str, str]:
    (container,) = pod_containers(dep)
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _secret_env(overlay: str, dep: dict) -> dict[str, str]:
    """Env fed from Secrets (secretKeyRef), resolved against the rendered Secrets."""
    (container,) = pod_containers(dep)
    env = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            secret = find(overlay, "Secret", ref["name"])
            if secret is not None and ref["key"] in secret.get("stringData", {}):
                env[e["name"]] = secret["stringData"][ref["key"]]
    return env


@overlays
def test_pods_get_kafka_credentials_from_the_keda_auth_secret(overlay):
    """Workers and the scaler read the same Secret as KEDA's TriggerAuthentication, and
    still start without it (optional), e.g. on a plaintext Kafka."""
    auth_secrets = {ref["name"] for auth in objects(overlay, "TriggerAuthentication")
                    for ref in auth["spec"]["secretTargetRef"]}
    for dep in objects(overlay, "Deployment"):
        (container,) = pod_containers(dep)
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})}
        name = dep["metadata"]["name"]
        assert refs["SPOTBATCH_KAFKA_SASL_USERNAME"]["key"] == "username", name
        assert refs["SPOTBATCH_KAFKA_SASL_PASSWORD"]["key"] == "password", name
        for ref in refs.values():
            assert ref["optional"] is True, name
            assert not auth_secrets or ref["name"] in auth_secrets, name
            assert find(overlay, "Secret", ref["name"]) is not None, name


@overlays
def test_pod_env_is_valid_spotbatch_settings(overlay, monkeypatch):
    """The ConfigMap plus each worker's env must load as Settings (a typo'd key or value
    would otherwise crash-loop every pod)."""
    data = config_data(overlay)
    for dep in objects(overlay, "Deployment"):
        (container,) = pod_containers(dep)
        assert {"configMapRef": {"name": "spotbatch-config"}} in container["envFrom"]
        env = {**data, **_env(dep), **_secret_env(overlay, dep)}
        for key in [k for k in os.environ if k.startswith("SPOTBATCH_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if key.startswith("SPOTBATCH_"):
                monkeypatch.setenv(key, value)
        try:
            settings = load_settings()
        except ConfigError as exc:
            pytest.fail(f"{overlay} {dep['metadata']['name']}: {exc}")
        unknown = {k for k in env if k.startswith("SPOTBATCH_")} - {f"SPOTBATCH_{f.upper()}" for f in type(settings).model_fields}
        assert not unknown, f"{overlay}: env keys Settings does not know: {unknown}"


@overlays
def test_grace_period_covers_the_drain_deadline(overlay):
    drain_s = float(config_data(overlay).get("SPOTBATCH_DRAIN_S", 25))
    for name in WORKERS.values():
        grace = _deployment(overlay, name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= drain_s + DRAIN_MARGIN_S, f"{overlay} {name}: grace {grace} s < drain {drain_s} s + margin"


NOTICE_S = {"aws": 120, "gke": 15, "azure": 30}  # FACTS: what each cloud gives a pod


@overlays
def test_drain_fits_the_clouds_notice(overlay):
    data = config_data(overlay)
    cloud = cloud_of(overlay)
    assert float(data["SPOTBATCH_DRAIN_S"]) < NOTICE_S[cloud]
    assert data["SPOTBATCH_NOTICE_SOURCE"] == {"aws": "aws", "gke": "gcp", "azure": "azure"}[cloud]


@overlays
def test_workers_request_a_gpu_and_report_it(overlay):
    for name in WORKERS.values():
        dep = _deployment(overlay, name)
        (container,) = pod_containers(dep)
        res = container["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1
        assert _env(dep)["SPOTBATCH_GPU_COUNT"] == str(res["limits"]["nvidia.com/gpu"])
        assert _env(dep)["SPOTBATCH_INSTANCE_TYPE"]


@overlays
def test_pods_are_locked_down(overlay):
    for dep in objects(overlay, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        name = dep["metadata"]["name"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], name
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp must be a writable emptyDir"


@overlays
def test_worker_caches_are_writable(overlay):
    for name in WORKERS.values():
        spec = _deployment(overlay, name)["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/home/spotbatch/.cache" in mounts  # HF_HOME / TORCH_HOME in the images


@overlays
def test_worker_probes_hit_the_metrics_port(overlay):
    metrics_port = int(config_data(overlay)["SPOTBATCH_METRICS_PORT"])
    for name in WORKERS.values():
        (container,) = pod_containers(_deployment(overlay, name))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/healthz"
            assert container_port(container, get["port"]) == metrics_port, f"{name} {probe}"


@overlays
def test_scaler_probes_use_grpc_health_on_the_served_port(overlay):
    (container,) = pod_containers(_deployment(overlay, SCALER))
    served = int(container["args"][container["args"].index("--port") + 1])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == served
    assert container_port(container, "grpc") == served
    metrics = int(container["args"][container["args"].index("--metrics-port") + 1])
    assert container_port(container, "metrics") == metrics


# --- scheduling per cloud (FACTS.md "Spot interruptions") -----------------------------

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
NODES = {  # cloud -> pool -> example nodes of that capacity type: (labels, taints)
    "aws": {
        "spot": [({"karpenter.sh/capacity-type": "spot"}, [GPU_TAINT]),
                 ({"eks.amazonaws.com/capacityType": "SPOT"}, [GPU_TAINT])],
        "on-demand": [({"karpenter.sh/capacity-type": "on-demand"}, [GPU_TAINT]),
                      ({"eks.amazonaws.com/capacityType": "ON_DEMAND"}, [GPU_TAINT])],
    },
    "gke": {
        "spot": [({"cloud.google.com/gke-spot": "true", "cloud.google.com/gke-accelerator": "nvidia-l4"},
                  [GPU_TAINT, {"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"}])],
        "on-demand": [({"cloud.google.com/gke-accelerator": "nvidia-l4"}, [GPU_TAINT])],
    },
    "azure": {
        "spot": [({"kubernetes.azure.com/scalesetpriority": "spot"},
                  [GPU_TAINT, {"key": "kubernetes.azure.com/scalesetpriority", "value": "spot", "effect": "NoSchedule"}])],
        "on-demand": [({"agentpool": "gpu"}, [GPU_TAINT])],
    },
}


def _schedulable(pod_spec: dict, labels: dict, taints: list[dict]) -> bool:
    if any(labels.get(k) != v for k, v in pod_spec.get("nodeSelector", {}).items()):
        return False
    required = (pod_spec.get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required and not any(all(_expression_holds(e, labels) for e in term.get("matchExpressions", []))
                            for term in required["nodeSelectorTerms"]):
        return False
    return all(any(_tolerates(t, taint) for t in pod_spec.get("tolerations", [])) for taint in taints)


def _tolerates(toleration: dict, taint: dict) -> bool:
    if toleration.get("effect") not in (None, taint["effect"]) or toleration.get("key") != taint["key"]:
        return False
    return toleration.get("operator") == "Exists" or toleration.get("value") == taint["value"]


@overlays
def test_each_pool_lands_on_its_capacity_type_only(overlay):
    nodes = NODES[cloud_of(overlay)]
    for pool, name in WORKERS.items():
        spec = _deployment(overlay, name)["spec"]["template"]["spec"]
        for other_pool, pool_nodes in nodes.items():
            for labels, taints in pool_nodes:
                assert _schedulable(spec, labels, taints) == (other_pool == pool), \
                    f"{overlay}: {pool} pool vs {other_pool} node {labels}"


# --- KEDA ----------------------------------------------------------------------------

def _scaled_objects(overlay: str) -> dict[str, dict]:
    return {so["spec"]["scaleTargetRef"]["name"]: so for so in objects(overlay, "ScaledObject")}


@overlays
def test_a_scaled_object_per_pool_targets_an_existing_deployment(overlay):
    scaled = _scaled_objects(overlay)
    assert set(scaled) == set(WORKERS.values())
    for target, so in scaled.items():
        assert so["metadata"]["name"] == target  # same name as its Deployment (interface 5)
        assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert _deployment(overlay, target)["metadata"]["namespace"] == so["metadata"]["namespace"]
        assert 0 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        assert so["spec"]["cooldownPeriod"] > 0 and so["spec"]["pollingInterval"] > 0
    assert scaled[WORKERS["spot"]]["spec"]["minReplicaCount"] == 0  # spot scales from zero
    assert scaled[WORKERS["on-demand"]]["spec"]["minReplicaCount"] >= 1  # the baseline


@overlays
def test_triggers_name_the_workers_group_and_topic(overlay):
    data = config_data(overlay)
    for so in objects(overlay, "ScaledObject"):
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == data["SPOTBATCH_GROUP"]
        assert meta["topic"] == data["SPOTBATCH_TOPIC"]
        assert meta["bootstrapServers"] == data["SPOTBATCH_KAFKA_BOOTSTRAP"]
        assert int(meta["lagThreshold"]) > 0


@plain_overlays
def test_plain_overlays_use_keda_kafka_with_the_auth_secret(overlay):
    for so in objects(overlay, "ScaledObject"):
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["offsetResetPolicy"] == "earliest"  # the workers' auto_offset_reset
        auth = find(overlay, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert auth is not None
        for ref in auth["spec"]["secretTargetRef"]:
            secret = find(overlay, "Secret", ref["name"])
            assert secret is not None and ref["key"] in secret["stringData"]
        assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} >= {"sasl", "username", "password", "tls", "ca"}


@overlays
def test_the_shipped_secret_is_marked_as_an_example(overlay):
    (secret,) = objects(overlay, "Secret")
    assert secret["metadata"]["annotations"]["spotbatch.dev/example"].startswith("true")
    assert "EXAMPLE" in secret["stringData"]["password"]


@hybrid_overlays
def test_hybrid_triggers_ask_the_scaler_for_their_pools_share(overlay):
    for pool, name in WORKERS.items():
        (trigger,) = find(overlay, "ScaledObject", name)["spec"]["triggers"]
        assert trigger["type"] == "external"
        meta = trigger["metadata"]
        assert set(meta) == {"scalerAddress", "bootstrapServers", "consumerGroup", "topic",
                             "lagThreshold", "mode", "pool", "baseline", "spotMax", "fallbackCap"}
        assert meta["pool"] == pool == _pod_labels(_deployment(overlay, name))["spotbatch.dev/pool"]
        assert meta["mode"] in ("lag", "work")
    # One pool policy: both triggers must carry the same keys, or the split disagrees.
    policies = [{k: v for k, v in find(overlay, "ScaledObject", name)["spec"]["triggers"][0]["metadata"].items()
                 if k in ("baseline", "spotMax", "fallbackCap")} for name in WORKERS.values()]
    assert policies[0] == policies[1]
    ondemand = find(overlay, "ScaledObject", WORKERS["on-demand"])["spec"]
    assert ondemand["maxReplicaCount"] >= int(policies[0]["baseline"]) + int(policies[0]["fallbackCap"])


@hybrid_overlays
def test_scaler_address_resolves_to_the_scaler_service(overlay):
    for so in objects(overlay, "ScaledObject"):
        address = so["spec"]["triggers"][0]["metadata"]["scalerAddress"]
        match = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)(?:\.svc(?:\.cluster\.local)?)?:(\d+)", address)
        assert match, f"scalerAddress {address!r} is not <service>.<namespace>.svc.cluster.local:<port>"
        name, namespace, port = match.group(1), match.group(2), int(match.group(3))
        svc = find(overlay, "Service", name, namespace)
        assert svc is not None, f"{address}: no Service {name} in namespace {namespace}"
        (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
        scaler = _deployment(overlay, name)
        assert _selects({"matchLabels": svc["spec"]["selector"]}, _pod_labels(scaler))
        (container,) = pod_containers(scaler)
        target = container_port(container, svc_port["targetPort"])
        assert target == int(container["args"][container["args"].index("--port") + 1])


# --- access --------------------------------------------------------------------------

def _rules(overlay: str, role: str) -> list[dict]:
    obj = find(overlay, "Role", role)
    assert obj is not None
    return obj["rules"]


@overlays
def test_rbac_is_least_privilege(overlay):
    assert not objects(overlay, "ClusterRole") and not objects(overlay, "ClusterRoleBinding")
    assert _rules(overlay, "spotbatch-scaler") == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch"]}]
    assert _rules(overlay, "spotbatch-scheduler") == [
        {"apiGroups": ["keda.sh"], "resources": ["scaledobjects"], "verbs": ["get", "list", "patch"]}]
    accounts = {sa["metadata"]["name"] for sa in objects(overlay, "ServiceAccount")}
    for binding in objects(overlay, "RoleBinding"):
        assert find(overlay, "Role", binding["roleRef"]["name"]) is not None
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts
            assert subject["namespace"] == NAMESPACE
    for dep in objects(overlay, "Deployment"):
        assert dep["spec"]["template"]["spec"]["serviceAccountName"] in accounts
    for name in WORKERS.values():  # workers never call the API: no token mounted
        assert _deployment(overlay, name)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def _policy_for(overlay: str, deployment: str) -> dict:
    labels = _pod_labels(_deployment(overlay, deployment))
    (policy,) = [p for p in objects(overlay, "NetworkPolicy") if _selects(p["spec"]["podSelector"], labels)]
    return policy


@overlays
def test_network_policies(overlay):
    scaler = _policy_for(overlay, SCALER)["spec"]
    grpc_rules = [r for r in scaler["ingress"] if {"port": 9090, "protocol": "TCP"} in r["ports"]]
    assert [r["from"] for r in grpc_rules] == [
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": KEDA_NAMESPACE}}}]]
    for name in WORKERS.values():
        worker = _policy_for(overlay, name)["spec"]
        assert set(worker["policyTypes"]) == {"Ingress", "Egress"}
        ingress_ports = {p["port"] for r in worker["ingress"] for p in r["ports"]}
        assert ingress_ports == {int(config_data(overlay)["SPOTBATCH_METRICS_PORT"])}
        egress_ports = {p["port"] for r in worker["egress"] for p in r["ports"]}
        assert {53, 9092, 443} <= egress_ports and egress_ports <= {53, 80, 443, 9092, 9093, 9094, 9096, 9098}
        assert all("ports" in r for r in worker["egress"])  # no allow-all egress rule


ROLLOUT_CONTROLLER = "spotbatch-rollout-controller"


@overlays
def test_rollout_controller_runs_once_without_api_access(overlay):
    """It only talks to Kafka: one replica (Recreate), no token, no ingress, egress to DNS and Kafka."""
    dep = _deployment(overlay, ROLLOUT_CONTROLLER)
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    (container,) = pod_containers(dep)
    assert container["args"][:2] == ["rollout", "controller"]
    account = spec["template"]["spec"]["serviceAccountName"]
    assert spec["template"]["spec"]["automountServiceAccountToken"] is False
    assert find(overlay, "ServiceAccount", account)["automountServiceAccountToken"] is False
    assert not [b for b in objects(overlay, "RoleBinding") if any(s["name"] == account for s in b["subjects"])]
    policy = _policy_for(overlay, ROLLOUT_CONTROLLER)["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and not policy.get("ingress")
    egress_ports = {p["port"] for r in policy["egress"] for p in r["ports"]}
    assert egress_ports == {53, 9092, 9093, 9094, 9096, 9098}
    assert config_data(overlay)["SPOTBATCH_MODELS_TOPIC"]
