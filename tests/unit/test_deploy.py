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
