"""/metrics content, a real Prometheus scraping it, and aborts on client disconnect."""

import shutil
import subprocess
import time

import httpx
import pytest

from clients.local_server import free_port

MODEL = "SmolLM2-135M-Instruct"


def metric_value(text: str, name: str, **labels) -> float:
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name}{labels} not in /metrics"
    return total


def test_metrics_expose_vllm_and_steer_series(http, openai_client):
    before = http.get("/metrics").text
    openai_client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5,
                                     extra_body={"typical_p": 0.8})
    text = http.get("/metrics").text
    assert "vllm:num_requests_running" in text and "vllm:generation_tokens_total" in text
    for name in ("steer_token_entropy_nats_bucket", "steer_token_varentropy_nats2_bucket",
                 "steer_requests_total", "steer_time_to_first_token_seconds_bucket",
                 "steer_request_latency_seconds_bucket"):
        assert name in text, name
    count = metric_value(text, "steer_token_entropy_nats_count", model=MODEL, method="typical")
    prior = (metric_value(before, "steer_token_entropy_nats_count", model=MODEL, method="typical")
             if 'method="typical"' in before else 0.0)
    assert count - prior == 5
    assert metric_value(text, "steer_requests_total", model=MODEL, method="typical") >= 1


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")
def test_real_prometheus_scrapes_entropy(server, openai_client, tmp_path):
    openai_client.completions.create(model=MODEL, prompt="Scrape me", max_tokens=4)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: steer\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline and not result:
            time.sleep(1)
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                                  params={"query": "sum by (method) "
                                          "(steer_token_entropy_nats_count)"}).json()
                result = reply["data"]["result"]
            except (httpx.HTTPError, KeyError):
                continue
        assert result, "Prometheus never saw steer_token_entropy_nats_count"
        assert float(result[0]["value"][1]) > 0
    finally:
        prom.terminate()
        prom.wait(30)


def test_client_disconnect_aborts_engine_requests(server, http):
    def running() -> float:
        return metric_value(http.get("/metrics").text, "vllm:num_requests_running")

    payload = {"model": MODEL, "prompt": "Write a very long story about a dragon.",
               "max_tokens": 2000, "temperature": 1.0, "n": 2, "stream": True,
               "ignore_eos": True}  # long enough to still run when the client leaves
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=payload,
                      headers=http.headers, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 4:
                break  # leave mid-stream
    deadline = time.monotonic() + 30
    while running() > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running() == 0
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", headers=http.headers,
                   json={**payload, "stream": False}, timeout=2)
    deadline = time.monotonic() + 30
    while running() > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running() == 0
