"""The deploy files: Dockerfiles pass hadolint, compose, Grafana and Kubernetes files are well
formed (promtool's checks, which need Prometheus installed, are in tests/e2e/test_deploy.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is not installed (`make test` installs it)")
    return path


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    done = subprocess.run([tool("hadolint"), "--no-color", dockerfile], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_stack_is_complete():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"steer", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    steer = compose["services"]["steer"]
    assert (DEPLOY / steer["build"]["context"] / "Dockerfile").exists()
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == "steer:8000"


def test_kubernetes_manifests():
    docs = {d["kind"]: d for d in yaml.safe_load_all(
        (DEPLOY / "k8s" / "entropy-steer.yaml").read_text())}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service", "ServiceMonitor"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert {"models", "artifacts"} <= mounts
    assert pod["securityContext"]["runAsNonRoot"]
    labels = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert docs["Service"]["spec"]["selector"] == labels
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"


MANIFESTS = ["entropy-steer.yaml", "entropy-steer-replicas.yaml"]
CRDS = {"ServiceMonitor"}  # the Prometheus Operator's: not in Kubernetes' own schemas


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_manifests_match_the_kubernetes_schemas(manifest):
    import kubernetes_validate

    for doc in yaml.safe_load_all((DEPLOY / "k8s" / manifest).read_text()):
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["spec"]["endpoints"]
            continue
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_replicas_share_one_read_write_many_volume_and_autoscale_on_waiting_requests():
    docs = {d["kind"]: d for d in yaml.safe_load_all(
        (DEPLOY / "k8s" / "entropy-steer-replicas.yaml").read_text())}
    single = {d["kind"]: d for d in yaml.safe_load_all(
        (DEPLOY / "k8s" / "entropy-steer.yaml").read_text())}
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    deployment = docs["Deployment"]
    assert deployment["spec"]["replicas"] > 1
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert hpa["minReplicas"] == deployment["spec"]["replicas"] < hpa["maxReplicas"]
    # prometheus-adapter's name for vllm:num_requests_waiting (its rule is in docs/deploy.md)
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert "vllm:num_requests_waiting" in (ROOT / "docs" / "deploy.md").read_text()
    # The pods are the single-replica manifest's but for the shared claim: no drift.
    template = json.loads(json.dumps(deployment["spec"]["template"]))
    template["spec"]["volumes"] = [
        {**v, "persistentVolumeClaim": {"claimName": "entropy-steer-artifacts"}}
        if v["name"] == "artifacts" else v for v in template["spec"]["volumes"]]
    assert template == single["Deployment"]["spec"]["template"]
    assert docs["Service"] == single["Service"]


def test_grafana_provisioning_points_at_the_dashboard():
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/entropy-steer.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/entropy-steer.json").read_text())
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("entropy", "varentropy", "requests", "latency", "particle", "difficulty"):
        assert topic in titles
