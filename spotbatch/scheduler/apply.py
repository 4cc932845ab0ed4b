"""Apply a hybrid setting to the two KEDA ScaledObjects.

For each pool's ScaledObject (names from k8s/base): minReplicaCount, maxReplicaCount,
and the pool keys in its spotbatch external trigger's metadata (pools.METADATA_KEYS,
which the splitter reads), plus lagThreshold when the setting comes from a plan. The change is a JSON merge patch; ``spec.triggers`` is a
list, which a merge patch replaces whole, so the patch carries every trigger as read,
with only our keys changed.

The Kubernetes API sits behind ``ScaledObjects`` (get + patch); ``KubeScaledObjects``
is the real one, on the official ``kubernetes`` client.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any, Protocol

import yaml

from spotbatch.scheduler.pools import PoolConfig, config_to_metadata

__all__ = ["ScaledObjects", "KubeScaledObjects", "Change", "ApplyError", "plan_changes", "apply_changes",
           "SCALED_OBJECTS", "NAMESPACE"]

NAMESPACE = "spotbatch"
SCALED_OBJECTS = {"on-demand": "spotbatch-worker-ondemand", "spot": "spotbatch-worker-spot"}
_EXTERNAL = ("external", "external-push")


class ApplyError(RuntimeError):
    """The cluster refused or lacks what apply needs; one line with the fix."""


class ScaledObjects(Protocol):
    def get(self, name: str) -> dict[str, Any]: ...

    def patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]: ...


class KubeScaledObjects:
    """keda.sh/v1alpha1 scaledobjects in one namespace, through CustomObjectsApi."""

    def __init__(self, *, namespace: str = NAMESPACE, kubeconfig: str | None = None, context: str | None = None) -> None:
        from kubernetes import client, config

        try:
            if kubeconfig is None and context is None and _in_cluster():
                config.load_incluster_config()
                api_client = client.ApiClient()
            else:
                api_client = config.new_client_from_config(config_file=kubeconfig, context=context, persist_config=False)
        except (config.ConfigException, FileNotFoundError) as exc:
            raise ApplyError(f"no Kubernetes credentials ({exc}); pass --kubeconfig FILE (and --context) or run in-cluster") from None
        self._api = client.CustomObjectsApi(api_client)
        self._namespace = namespace
        self._errors = client.exceptions.ApiException
        import urllib3

        self._transport_errors = urllib3.exceptions.HTTPError

    def get(self, name: str) -> dict[str, Any]:
        return self._call("get", name, lambda **kw: self._api.get_namespaced_custom_object(**kw))

    def patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("patch", name, lambda **kw: self._api.patch_namespaced_custom_object(body=body, **kw))

    def _call(self, verb: str, name: str, fn) -> dict[str, Any]:
        try:
            return fn(group="keda.sh", version="v1alpha1", namespace=self._namespace, plural="scaledobjects", name=name)
        except self._errors as exc:
            hint = {404: "apply the hybrid manifests first (kubectl apply -k k8s/overlays/<cloud>-hybrid)",
                    403: "grant get/patch on keda.sh scaledobjects (Role spotbatch-scheduler in k8s/base/rbac.yaml)"}
            raise ApplyError(f"{verb} scaledobject {self._namespace}/{name}: HTTP {exc.status} {exc.reason}; "
                             f"{hint.get(exc.status, 'check the API server and your credentials')}") from None
        except (OSError, self._transport_errors) as exc:  # refused, DNS, TLS, retries exhausted
            raise ApplyError(f"{verb} scaledobject {self._namespace}/{name}: {exc}; check --kubeconfig/--context") from None


def _in_cluster() -> bool:
    from spotbatch.config import Environment

    return bool(Environment().kubernetes_service_host)


@dataclass(frozen=True)
class Change:
    pool: str
    name: str
    current: dict[str, Any]  # the managed part of spec, as read
    desired: dict[str, Any]

    @property
    def changed(self) -> bool:
        return self.current != self.desired

    def patch_body(self) -> dict[str, Any]:
        return {"spec": self.desired}

    def diff(self) -> str:
        before = yaml.safe_dump({"spec": self.current}, sort_keys=True).splitlines(keepends=True)
        after = yaml.safe_dump({"spec": self.desired}, sort_keys=True).splitlines(keepends=True)
        return "".join(difflib.unified_diff(before, after, f"{self.name} (cluster)", f"{self.name} (setting)"))


def plan_changes(api: ScaledObjects, pools: PoolConfig, max_total: int, *,
                 lag_threshold: int | None = None) -> list[Change]:
    """What apply would change on each pool's ScaledObject (reads only). ``lag_threshold``
    (the one a plan was simulated with) is written too when given."""
    bounds = pools.max_replicas(max_total)
    minimum = {"on-demand": pools.baseline, "spot": 0}
    meta = config_to_metadata(pools)
    if lag_threshold is not None:
        meta["lagThreshold"] = str(lag_threshold)
    changes = []
    for pool, name in SCALED_OBJECTS.items():
        spec = api.get(name).get("spec") or {}
        triggers: list[dict] = spec.get("triggers") or []
        current = {"minReplicaCount": spec.get("minReplicaCount"), "maxReplicaCount": spec.get("maxReplicaCount"),
                   "triggers": triggers}
        desired = {"minReplicaCount": minimum[pool],
                   # KEDA needs max >= max(min, 1); a pool with no share stays at 0 anyway
                   "maxReplicaCount": max(bounds[pool], minimum[pool], 1),
                   "triggers": _with_metadata(triggers, meta, pool, name)}
        changes.append(Change(pool, name, current, desired))
    return changes


def _with_metadata(triggers: list[dict], meta: dict[str, str], pool: str, name: str) -> list[dict]:
    out = copy.deepcopy(triggers)
    ours = [t for t in out if t.get("type") in _EXTERNAL and (t.get("metadata") or {}).get("pool")]
    if not ours:
        raise ApplyError(f"scaledobject {name} has no external trigger with a pool key; deploy the hybrid variant "
                         "(k8s/components/hybrid, e.g. kubectl apply -k k8s/overlays/aws-hybrid) first")
    for trigger in ours:
        if trigger["metadata"]["pool"] != pool:
            raise ApplyError(f"scaledobject {name} serves pool {trigger['metadata']['pool']!r}, expected {pool!r}; "
                             "fix its trigger metadata pool")
        trigger["metadata"].update(meta)
    return out


def apply_changes(api: ScaledObjects, changes: list[Change]) -> list[str]:
    """Patch the ScaledObjects that differ; returns their names."""
    patched = []
    for change in changes:
        if change.changed:
            api.patch(change.name, change.patch_body())
            patched.append(change.name)
    return patched
