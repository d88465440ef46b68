"""configs/kubernetes/: the HPA (through prometheus-adapter) and the KEDA
ScaledObject that scale a backend Deployment by lb's recommendation, checked
offline: well-formed YAML, the fields each API requires, and every metric
they name is one lb's admin exposes."""

from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT

K8S = ROOT / "configs" / "kubernetes"


def _metric_names() -> set[str]:
    """Every metric family name lb/admin/metrics.py can expose."""
    text = (ROOT / "lb" / "admin" / "metrics.py").read_text()
    return set(re.findall(r'"(lb_[a-z0-9_]+)"', text))


def test_hpa_scales_on_the_recommendation():
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["kind"] == "HorizontalPodAutoscaler"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"]["kind"] == "Deployment" and spec["scaleTargetRef"]["name"]
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    [m] = spec["metrics"]
    assert m["type"] == "External"
    name = m["external"]["metric"]["name"]
    assert name in _metric_names()
    assert m["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    adapter = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    [rule] = adapter["externalRules"]
    assert rule["seriesQuery"] == name and rule["name"]["as"] == name
    assert "<<.Series>>" in rule["metricsQuery"]


def test_keda_scaled_object_queries_an_exposed_metric():
    so = yaml.safe_load((K8S / "keda-scaledobject.yaml").read_text())
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] and 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    [trig] = spec["triggers"]
    assert trig["type"] == "prometheus" and trig["metricType"] == "AverageValue"
    meta = trig["metadata"]
    assert meta["serverAddress"].startswith("http") and float(meta["threshold"]) == 1.0
    names = set(re.findall(r"lb_[a-z0-9_]+", meta["query"]))
    assert names and names <= _metric_names()


# -- lb itself in Kubernetes (configs/kubernetes/lb.yaml, backends-headless.yaml) ------------

K8S_VERSION = "1.30.0"  # the oldest version the examples claim to work with


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def test_every_resource_validates_against_the_kubernetes_schema():
    """Strict schema validation, offline (the kubernetes-validate package)."""
    import kubernetes_validate

    checked = 0
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or "apiVersion" not in doc or doc["apiVersion"].startswith("keda.sh/"):
                continue  # prometheus-adapter's rules file; KEDA's CRD has no schema here
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
    assert checked >= 6


def test_lb_manifests_agree_with_lb_and_with_each_other(tmp_path):
    from lb.core.config import load

    by_kind = {d["kind"]: d for d in _docs("lb.yaml")}
    assert set(by_kind) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    toml = tmp_path / "lb.toml"
    toml.write_text(by_kind["ConfigMap"]["data"]["lb.toml"])
    cfg = load(str(toml))  # a valid lb config

    dep = by_kind["Deployment"]
    pod = dep["spec"]["template"]
    [c] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(cfg.listen.rpartition(":")[2])
    assert ports["admin"] == int(cfg.admin.listen.rpartition(":")[2])
    assert not cfg.admin.listen.startswith("127."), "probes reach the admin by the pod's IP"
    assert c["readinessProbe"]["httpGet"] == {"path": "/api/health", "port": "admin"}
    assert "tcpSocket" in c["livenessProbe"]  # a backend outage must not restart lb
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    # graceful termination covers the preStop pause and the whole drain
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + cfg.timeouts.drain
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/etc/lb" in mounts and cfg.state_dir in mounts
    assert c["args"][-1].startswith("/etc/lb/")

    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = by_kind[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    assert by_kind["Service"]["spec"]["ports"][0]["targetPort"] == "http"

    # the backends: the SRV name lb resolves is the headless Service's
    [svc] = _docs("backends-headless.yaml")
    assert svc["spec"]["clusterIP"] == "None"
    [port] = svc["spec"]["ports"]
    ns = svc["metadata"]["namespace"]
    [entry] = cfg.backends
    assert entry.srv == f"_{port['name']}._tcp.{svc['metadata']['name']}.{ns}.svc.cluster.local"
