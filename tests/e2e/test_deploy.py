"""Deploy files against the live server: every dashboard and alert query names a metric the
server exports, and the images' entry point serves as a plain process. And promtool's checks
of the Prometheus config and alert rules (with the alerts' unit tests); `make test` installs
Prometheus."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from clients.bench.local_server import LocalServer
from tests.unit.test_deploy import tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\b(steer_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def exported_families(metrics_text: str) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+) ", metrics_text, re.M))


def family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_dashboard_and_alerts_query_exported_metrics(server):
    exported = exported_families(httpx.get(f"{server.base_url}/metrics").text)
    dashboard = json.loads((DEPLOY / "grafana/dashboards/entropy-steer.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"]]
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    queries += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    names = {m for q in queries for m in METRIC.findall(q)}
    assert len(names) >= 15
    missing = sorted(n for n in names if family(n) not in exported and n not in exported)
    assert not missing, missing


def dockerfile_instructions(path: Path) -> tuple[list[str], dict, list[str]]:
    """ENTRYPOINT, ENV and the HEALTHCHECK command of a Dockerfile (exec form)."""
    text = path.read_text().replace("\\\n", " ")
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    env = dict(re.findall(r"(\w+)=(\S+)", re.search(r"^ENV (.*)$", text, re.M).group(1)))
    health = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M).group(1))
    return entrypoint, env, health


def test_image_entry_point_serves_as_a_plain_process(tmp_path):
    """The GPU image's entry point and environment (model from STEER_MODEL, artifacts on the
    volume) start a working server; its HEALTHCHECK command passes against it. The CPU image has
    the same entry point."""
    from server.default_model import ensure_default_model

    entrypoint, env, health = dockerfile_instructions(ROOT / "Dockerfile")
    cpu_entrypoint, cpu_env, cpu_health = dockerfile_instructions(ROOT / "deploy/Dockerfile.cpu")
    assert cpu_entrypoint == entrypoint and "STEER_MODEL" not in cpu_env
    env = {**env, "STEER_MODEL": str(ensure_default_model()),
           "STEER_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "STEER_CACHE_DIR": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = LocalServer(entrypoint, tmp_path / "server.log", env=env).wait_healthy()
    port = server.port
    env = {**os.environ, **env, "STEER_PORT": str(port)}  # what the health check reads
    try:
        check = [sys.executable if health[0].startswith("python") else health[0], *health[1:]]
        done = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, shlex.join(check) + done.stderr
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert models[0]["id"] == "SmolLM2-135M-Instruct"
        assert (tmp_path / "artifacts" / "vectors").is_dir()
    finally:
        server.stop()


@pytest.mark.parametrize("args", [
    ["check", "config", "prometheus.yml"],
    ["check", "rules", "alerts.yml"],
    ["test", "rules", "alerts_test.yml"],
])
def test_prometheus_files_pass_promtool(args):
    done = subprocess.run([tool("promtool"), *args], cwd=DEPLOY / "prometheus",
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
