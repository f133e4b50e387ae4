"""`make image-test`: the CPU image (deploy/Dockerfile.cpu, built by `make image`) run as a
container on this host's network: healthy within a bound, one request of each steering method
answered with that method's report, and /metrics counting them. Figures (image size, time to
healthy) are printed for docs/deploy.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from clients.bench.local_server import free_port
from tests.prometheus import metric, samples

IMAGE = os.environ.get("STEER_IMAGE", "entropy-steer-cpu:local")
MODEL = "SmolLM2-135M-Instruct"
HEALTHY_WITHIN_S = 900
# pytest-timeout's bound for the first test (which starts the container) must not cut the wait
# short: past HEALTHY_WITHIN_S the test fails itself, with the container's log.
pytestmark = [pytest.mark.image, pytest.mark.timeout(HEALTHY_WITHIN_S + 300)]
STOP_WITHIN_S = 60  # docker stop waits 30 s for a clean exit, then kills
CHAT = [{"role": "user", "content": "What is 12 times 7?"}]
# One request per method: its `steering` field.
METHODS = {
    "typical": {"typical": {"p": 0.9}},
    "east": {"east": {"vector": "explore", "scale": 4.0}},
    "diffadapt": {"diffadapt": {"probe": "default"}},
    "particles": {"particles": {"n": 2, "max_steps": 2, "step_delimiter": " "}},
    "vreason": {"vreason": {}},
    "gates": {"gates": [{"signal": "entropy", "above": 0.5, "then": {"temperature": 0}}]},
    "dynatemp": {"dynatemp": {"range": 0.5}},
}


def docker(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def logs(name: str) -> str:
    done = subprocess.run(["docker", "logs", "--tail", "60", name], capture_output=True,
                          text=True, timeout=60)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def container():
    port = free_port()
    name = f"steer-image-test-{port}"
    started = time.monotonic()
    docker("run", "-d", "--name", name, "--network", "host", "--shm-size", "1g",
           "-e", f"STEER_PORT={port}", IMAGE)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            state = json.loads(docker("inspect", name))[0]["State"]
            assert state["Running"], logs(name)
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - started < HEALTHY_WITHIN_S, logs(name)
            time.sleep(1)
        healthy_s = time.monotonic() - started
        size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE))
        print(f"\n{IMAGE}: {size / 2**30:.2f} GiB, healthy {healthy_s:.0f} s after docker run")
        with httpx.Client(base_url=url, timeout=300) as http:
            yield http
    finally:
        stopped = time.monotonic()
        subprocess.run(["docker", "stop", "-t", "30", name], capture_output=True,
                       timeout=STOP_WITHIN_S)
        print(f"stopped in {time.monotonic() - stopped:.1f} s")
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=STOP_WITHIN_S)


def test_the_image_runs_as_the_unprivileged_user(container):
    user = docker("image", "inspect", "--format", "{{.Config.User}}", IMAGE).strip()
    assert user == "10001"
    assert container.get("/v1/models").json()["data"][0]["id"] == MODEL


def pem_blocks(text: str) -> set[str]:
    return set(re.findall(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END CERTIFICATE-----",
                          text, re.S))


def test_the_image_carries_neither_the_build_hosts_ca_nor_its_wheels():
    """The authorities the build host trusts beyond Debian's public set (a TLS proxy's, here)
    helped build the image and are in none of its files; nor is the build stage's pip set-up."""
    public_roots = Path("/usr/share/ca-certificates")
    if not public_roots.is_dir():
        pytest.skip("no Debian ca-certificates on this host to tell its own authorities apart")
    bundle = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                            capture_output=True, text=True).stdout.strip()
    host = pem_blocks(Path(bundle or "/etc/ssl/certs/ca-certificates.crt").read_text())
    public = set().union(*(pem_blocks(f.read_text()) for f in public_roots.rglob("*.crt")))
    extra = [block.splitlines()[len(block.splitlines()) // 2] for block in host - public]
    search = "test ! -e /etc/pip-build || echo /etc/pip-build"
    if extra:
        search += "; grep -rlsF -f /dev/stdin /etc /opt /usr /root /home"
    found = subprocess.run(
        ["docker", "run", "--rm", "-i", "--user", "0", "--entrypoint", "sh", IMAGE, "-c",
         search], input="\n".join(extra), capture_output=True, text=True, timeout=600)
    assert found.stdout == "", found.stdout
    print(f"{len(extra)} authorities of the build host's own: in no file of the image")


@pytest.mark.parametrize("method", METHODS)
def test_each_method_answers_with_its_report(container, method):
    r = container.post("/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "max_tokens": 16, "seed": 1,
        "steering": {**METHODS[method], "return_entropy": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    report = body["choices"][0]["steering"]
    assert method in report["methods"], report
    answered, generated = len(report["token_entropy"]), body["usage"]["completion_tokens"]
    if method == "particles":  # usage counts every particle's tokens; the entropy the answer's
        assert 0 < answered <= generated == report["particles"]["generated_tokens"]
    else:
        assert 0 < answered == generated


def test_structured_output_with_steering(container):
    """vLLM's structured outputs (xgrammar) in the image, with a method on top."""
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    r = container.post("/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "max_tokens": 24, "temperature": 0,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "answer", "schema": schema}},
        "steering": {"typical": {"p": 0.9}}})
    assert r.status_code == 200, r.text
    answer = json.loads(r.json()["choices"][0]["message"]["content"])
    assert set(answer) == {"answer"} and isinstance(answer["answer"], int)


def test_metrics_count_the_methods(container):
    before = container.get("/metrics").text
    r = container.post("/v1/completions", json={
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": 8,
        "steering": {"typical": {"p": 0.9}}})
    assert r.status_code == 200, r.text
    after = container.get("/metrics").text
    counted = metric(after, "steer_token_entropy_nats_count") - metric(
        before, "steer_token_entropy_nats_count")
    assert counted == r.json()["usage"]["completion_tokens"]
    counted_methods = {method for (name, labels) in samples(after)
                       if name == "steer_requests_total"
                       for method in dict(labels)["method"].split("+")}
    assert set(METHODS) <= counted_methods
    assert metric(after, "vllm:num_requests_running") == 0
