"""The monitoring objects under k8s/monitoring: the PrometheusRule's alerts pass
`promtool check rules` and `promtool test rules` (Debian's `prometheus` package; `make
setup` installs it), the PodMonitor/ServiceMonitor/PrometheusRule validate against the
Prometheus Operator's CRDs in ../shared/ref/prometheus-operator, the monitors select the
pods and ports the base manifests really have, and every metric the alerts and the
dashboard name is one the worker or the scaler exports.

tests/integration/test_monitoring_live.py runs the same expressions against a real
Prometheus scraping a real worker and a real scaler.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.k8s_render import (MONITORING, PROMETHEUS_OPERATOR_REF, config_data, crd_validator, debian_tool, find,
                              render_dir, schema_errors)

RULE_FILE = MONITORING / "prometheusrule.yaml"
RULE_TESTS = MONITORING / "tests" / "spotbatch-rules.test.yaml"
DASHBOARD = MONITORING / "dashboards" / "spotbatch.json"
CRDS = {"PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
        "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
        "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}
# The alerts the operator asked for (issue 13), by name.
REQUIRED_ALERTS = {"SpotbatchJobsDeadLettered", "SpotbatchDrainHitDeadline", "SpotbatchWorkerStalled",
                   "SpotbatchWorkerUnhealthy", "SpotbatchLagGrowingAtMaxReplicas",
                   "SpotbatchOnDemandFallbackActive", "SpotbatchCheckpointWritesFailing"}
# Series from kube-state-metrics (part of kube-prometheus-stack), not from spotbatch.
KUBE_STATE_METRICS = {
    "kube_horizontalpodautoscaler_status_current_replicas", "kube_horizontalpodautoscaler_spec_max_replicas",
    "kube_horizontalpodautoscaler_status_desired_replicas", "kube_horizontalpodautoscaler_spec_min_replicas",
    "kube_deployment_spec_replicas", "kube_deployment_status_replicas_ready", "kube_pod_status_ready",
    "kube_pod_container_status_restarts_total",
}


def rule() -> dict:
    return yaml.safe_load(RULE_FILE.read_text())


def alerts() -> list[dict]:
    return [r for g in rule()["spec"]["groups"] for r in g["rules"] if "alert" in r]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (spotbatch's, `up`, kube-state-metrics')."""
    return set(re.findall(r"\b(spotbatch_[a-z_]+|kube_[a-z_]+|up)\b(?=\s*[{\[)=<>!*/+-]|\s*$)", expr))


def write_rule_files(folder: Path) -> Path:
    """The PrometheusRule's groups as a plain rule file, beside a copy of the promtool tests
    whose expected alerts get each rule's static annotations (summary, runbook) filled in,
    so the test file checks the templated description and stays readable."""
    (folder / "spotbatch-rules.yaml").write_text(yaml.safe_dump({"groups": rule()["spec"]["groups"]},
                                                                sort_keys=False))
    static = {a["alert"]: {k: v for k, v in a["annotations"].items() if k != "description"} for a in alerts()}
    tests = yaml.safe_load(RULE_TESTS.read_text())
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            for expected in check.get("exp_alerts", []):
                expected["exp_annotations"] = {**static[check["alertname"]], **expected.get("exp_annotations", {})}
    path = folder / RULE_TESTS.name
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return path


def promtool() -> str:
    return debian_tool("promtool")


# --- promtool ----------------------------------------------------------------------------

def test_promtool_checks_the_rules(tmp_path):
    write_rule_files(tmp_path)
    proc = subprocess.run([promtool(), "check", "rules", str(tmp_path / "spotbatch-rules.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule()['spec']['groups'])} rules found" in proc.stdout


def test_promtool_unit_tests_pass(tmp_path):
    path = write_rule_files(tmp_path)
    proc = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_tests_catch_a_broken_alert(tmp_path):
    """The unit tests bite: an alert whose threshold is off fails them."""
    path = write_rule_files(tmp_path)
    rules = yaml.safe_load((tmp_path / "spotbatch-rules.yaml").read_text())
    for group in rules["groups"]:
        for r in group["rules"]:
            if r.get("alert") == "SpotbatchJobsDeadLettered":
                r["expr"] = r["expr"].replace("> 1", "> 5")
    (tmp_path / "spotbatch-rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "SpotbatchJobsDeadLettered" in proc.stdout + proc.stderr


def test_every_alert_is_tested_firing_and_has_a_runbook():
    names = {a["alert"] for a in alerts()}
    assert REQUIRED_ALERTS <= names
    tests = yaml.safe_load(RULE_TESTS.read_text())
    fired = {c["alertname"] for t in tests["tests"] for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
    assert fired == names, f"alerts without a firing promtool case: {sorted(names - fired)}"
    for a in alerts():
        assert a["labels"]["severity"] in {"warning", "critical"}, a["alert"]
        assert {"summary", "description", "runbook"} <= set(a["annotations"]), a["alert"]
        assert len(a["annotations"]["runbook"]) > 60, f"{a['alert']}: a runbook line says what to do"
        assert "{{" not in a["annotations"]["summary"] + a["annotations"]["runbook"]


# --- the objects and the CRDs --------------------------------------------------------------

def monitoring_objects() -> tuple[dict, ...]:
    return render_dir(MONITORING)


@functools.lru_cache(maxsize=None)
def _validator(kind: str):
    return crd_validator(PROMETHEUS_OPERATOR_REF, CRDS[kind], "put the Prometheus Operator's CRD YAMLs there "
                         "(../shared/ref/prometheus-operator) to validate the monitors")


def test_monitoring_objects_validate_against_the_operator_crds():
    objs = monitoring_objects()
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "PodMonitor", "PrometheusRule", "ServiceMonitor"]
    for obj in objs:
        assert obj["metadata"]["namespace"] == "spotbatch"
        if obj["kind"] == "ConfigMap":
            continue
        api_version, validator = _validator(obj["kind"])
        assert obj["apiVersion"] == api_version
        errors = schema_errors(validator, obj)
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: {errors}"


def test_crd_validation_rejects_a_misspelt_field():
    _, validator = _validator("PodMonitor")
    (pm,) = [o for o in monitoring_objects() if o["kind"] == "PodMonitor"]
    pm = json.loads(json.dumps(pm))
    pm["spec"]["podMetricsEndpoints"][0]["relabellings"] = []  # the field is `relabelings`
    assert not validator.is_valid(pm)


def _labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("overlay", ["aws", "gke-hybrid"])
def test_monitors_select_the_workers_and_the_scaler_on_their_metrics_ports(overlay):
    objs = {o["kind"]: o for o in monitoring_objects()}
    pm, sm = objs["PodMonitor"], objs["ServiceMonitor"]
    for name in ("spotbatch-worker-spot", "spotbatch-worker-ondemand"):
        template = find(overlay, "Deployment", name)["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert _labels_match(pm["spec"]["selector"], labels), name
        ports = {p.get("name"): p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
        endpoint = pm["spec"]["podMetricsEndpoints"][0]
        assert ports[endpoint["port"]] == int(config_data(overlay)["SPOTBATCH_METRICS_PORT"])
        # pool and model become series labels, from pod labels that are really there
        relabel = {r["targetLabel"]: r["sourceLabels"][0] for r in endpoint["relabelings"]}
        for target, label in (("pool", "spotbatch.dev/pool"), ("model", "spotbatch.dev/model")):
            assert relabel[target] == "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)
            assert labels[label]
        assert labels["spotbatch.dev/model"] == config_data(overlay)["SPOTBATCH_MODEL"]
    service = find(overlay, "Service", "spotbatch-scaler")
    assert _labels_match(sm["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert pm["spec"]["jobLabel"] == "app.kubernetes.io/name" == sm["spec"]["jobLabel"]


def test_the_dashboard_ships_as_a_grafana_sidecar_configmap():
    (cm,) = [o for o in monitoring_objects() if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["spotbatch.json"]) == dashboard()


# --- metric names --------------------------------------------------------------------------

def exported_names() -> set[str]:
    """Every series name the worker and the scaler can export."""
    from prometheus_client import CollectorRegistry

    from spotbatch.scaler.service import _Metrics
    from spotbatch.workers.metrics import WorkerMetrics

    registry = CollectorRegistry()
    _Metrics(registry)
    names = {"up"}
    for reg in (WorkerMetrics().registry, registry):
        for family in reg.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            names |= {family.name + s for s in suffixes}
    return names


def test_alerts_and_dashboard_name_only_exported_metrics():
    exported = exported_names()
    exprs = [(a["alert"], a["expr"]) for a in alerts()] + dashboard_exprs()
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        unknown = names - exported - KUBE_STATE_METRICS
        assert not unknown, f"{where}: {sorted(unknown)} is exported by neither the worker nor the scaler"


def test_dashboard_covers_what_operators_watch():
    d = dashboard()
    assert d["uid"] and d["schemaVersion"] >= 36
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "spot_price_per_h", "on_demand_price_per_h"} <= variables
    titles = " | ".join(p["title"].lower() for p in d["panels"])
    for needle in ("rows/s", "jobs/s", "batch size", "latency", "lag", "replicas", "drain", "stops",
                   "dead letters", "cost per 1,000 rows"):
        assert needle in titles, needle
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    rows_by = [e for t, e in dashboard_exprs() if t.startswith("Rows/s") or t.startswith("Jobs/s")]
    assert all("by (pool, model" in e for e in rows_by)
