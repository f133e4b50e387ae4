"""/metrics content, a real Prometheus scraping it, and aborts on client disconnect."""

import shutil
import subprocess
import time

import httpx
import pytest

from clients.bench.local_server import free_port
from tests.prometheus import metric, samples

MODEL = "SmolLM2-135M-Instruct"


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
    count = metric(text, "steer_token_entropy_nats_count", model=MODEL, method="typical")
    prior = metric(before, "steer_token_entropy_nats_count", model=MODEL, method="typical")
    assert count - prior == 5  # every metric's exact increments: test_every_steer_metric_...


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
        return metric(http.get("/metrics").text, "vllm:num_requests_running")

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


class Increments:
    """What known traffic added to each sample, read as exact differences of /metrics."""

    def __init__(self, http) -> None:
        self.http, self.before = http, samples(http.get("/metrics").text)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.after = samples(self.http.get("/metrics").text)

    def __call__(self, name: str, **labels) -> float:
        key = (name, frozenset({"model": MODEL, **labels}.items()))
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)


def complete(http, **body) -> dict:
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Count: one, two,",
                                                  "ignore_eos": True, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_every_steer_metric_counts_known_traffic(http, server):
    """Each metric of the README's table, by its exact labels: the increments that known
    requests make (2 typical requests of 5 tokens, 1 EAST of 4, a DiffAdapt question, a
    2-particle run, a refused request, a client that leaves)."""
    with Increments(http) as typical:
        for seed in (1, 2):
            complete(http, max_tokens=5, typical_p=0.5, seed=seed)
    for name in ("steer_requests_total", "steer_time_to_first_token_seconds_count",
                 "steer_request_latency_seconds_count"):
        assert typical(name, method="typical") == 2, name
    for name in ("steer_generated_tokens_total", "steer_token_entropy_nats_count",
                 "steer_token_varentropy_nats2_count"):
        assert typical(name, method="typical") == 10, name
    assert typical("steer_steered_tokens_total", method="typical") == 0
    assert typical("steer_requests_total", method="none") == 0

    with Increments(http) as east:
        complete(http, max_tokens=4, steering={"east": {"vector": "explore", "scale": 1.0}})
    assert east("steer_steered_tokens_total", method="east") == 4
    assert east("steer_generated_tokens_total", method="east") == 4

    with Increments(http) as diffadapt:
        reply = http.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 4, "steering": {"diffadapt": {"probe": "default"}},
            "messages": [{"role": "user", "content": "What is 2 + 2?"}]}).json()
    difficulty = reply["choices"][0]["steering"]["diffadapt"]["difficulty"]
    assert diffadapt("steer_difficulty_class_total", difficulty=difficulty) == 1
    assert diffadapt("steer_requests_total", method="diffadapt") == 1

    with Increments(http) as particles:
        reply = complete(http, max_tokens=24, prompt="Q: 3 + 4?\n\nA:", steering={
            "particles": {"n": 2, "max_steps": 3, "step_delimiter": " "}})
    run = reply["choices"][0]["steering"]["particles"]
    assert particles("steer_particle_steps_count", method="particles") == 1
    assert particles("steer_particle_steps_sum", method="particles") == len(run["steps"])
    for name in ("steer_particle_ess_ratio_count", "steer_particle_temperature_count"):
        assert particles(name, method="particles") == len(run["steps"]), name
    assert particles("steer_particle_resamples_total", method="particles") == run["resamples"]

    with Increments(http) as refused:
        payload = {"model": MODEL, "prompt": "A long story:", "max_tokens": 2000,
                   "ignore_eos": True, "stream": True, "typical_p": 0.25}
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=payload,
                          headers=http.headers, timeout=60) as response:
            next(response.iter_lines())  # leave mid-stream
        deadline = time.monotonic() + 30
        while metric(http.get("/metrics").text, "steer_held_sequences") > 0 and \
                time.monotonic() < deadline:
            time.sleep(0.25)
    assert refused("steer_request_errors_total", method="typical", status="499") == 1
    assert refused("steer_requests_total", method="typical") == 1

    text = http.get("/metrics").text
    assert metric(text, "steer_engine_up", model=MODEL) == 1
    assert metric(text, "steer_held_sequences", model=MODEL) == 0
    assert metric(text, "steer_sequence_limit", model=MODEL) >= 2  # exact: lifecycle
