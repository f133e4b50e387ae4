"""The Python client (sync and async), `steer chat` / `steer complete`, and the examples, against
the live server."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clients.sdk import AsyncClient, Client, SteerError
from tests.conftest import ADMIN_KEY, API_KEY

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is 3 + 4? End with 'Answer: <number>'."}]


@pytest.fixture()
def client(server):
    with Client(server.base_url, api_key=API_KEY, admin_key=ADMIN_KEY) as c:
        yield c


def test_chat_and_completion_with_steering(client, http):
    steering = {"typical": {"p": 0.9}, "return_entropy": True}
    result = client.chat(QUESTION, steering=steering, max_tokens=8, seed=3)
    raw = http.post("/v1/chat/completions", json={
        "messages": QUESTION, "max_tokens": 8, "seed": 3,
        "steering": {"typical": {"p": 0.9}, "return_entropy": True}}).json()
    assert result.text == raw["choices"][0]["message"]["content"]
    assert len(result.entropy) == result.usage["completion_tokens"]
    done = client.complete("The capital of France is", max_tokens=4, temperature=0)
    assert done.finish_reason in ("length", "stop") and done.text


def test_a_misspelt_option_is_refused_naming_it(client):
    with pytest.raises(SteerError) as info:
        client.chat(QUESTION, steering={"typicall": {"p": 0.9}})
    assert info.value.status == 400 and info.value.param == "steering.typicall"


def test_server_errors_are_exceptions_with_the_message(client):
    with pytest.raises(SteerError) as info:
        client.chat(QUESTION, max_tokens=4, steering={"diffadapt": {"probe": "missing"}})
    assert info.value.status == 404 and info.value.param == "steering.diffadapt.probe"
    assert "missing" in info.value.message
    with pytest.raises(SteerError) as info:
        list(client.stream_chat(QUESTION, max_tokens=4, temperature=9))
    assert info.value.status == 400 and info.value.param == "temperature"


def test_streaming_exposes_entropy_and_particle_progress(client):
    events = list(client.stream_chat(QUESTION, max_tokens=12, steering={"return_entropy": True}))
    tokens = sum(len(e.entropy) for e in events)
    assert events[-1].finish_reason and events[-1].steering["token_entropy"]
    assert tokens == len(events[-1].steering["token_entropy"])
    events = list(client.stream_chat(QUESTION, max_tokens=32,
                                     steering={"particles": {"n": 2, "max_steps": 2}}))
    assert any(e.progress for e in events) and events[-1].steering["particles"]


def test_artifact_management(client):
    hidden = client.models()[0]["hidden_size"]
    stored = client.upload_vector("client-vec", [0.5] * hidden, 3, "from the client")
    assert stored["layer"] == 3
    assert "client-vec" in {v["id"] for v in client.list_artifacts("vectors")}
    assert len(client.get_artifact("vectors", "client-vec", include_data=True)["values"]) == \
        hidden
    probe = client.get_artifact("probes", "default", include_data=True)
    body = {"name": "client-probe", "weights": probe["weights"],
            "thresholds": probe["thresholds"]}
    assert client.upload_probe(body)["width"] == probe["width"]
    for kind, name in (("vectors", "client-vec"), ("probes", "client-probe")):
        assert client.delete_artifact(kind, name)["deleted"]
    with pytest.raises(SteerError) as info:
        client.delete_artifact("probes", "client-probe")
    assert info.value.status == 404


def test_async_client(server):
    async def run():
        async with AsyncClient(server.base_url, api_key=API_KEY) as c:
            results = await asyncio.gather(*(c.complete("One, two,", max_tokens=3,
                                                        temperature=0) for _ in range(3)))
            events = [e async for e in c.stream_chat(QUESTION, max_tokens=5)]
            probes = await c.list_artifacts("probes")
        return results, events, probes

    results, events, probes = asyncio.run(run())
    assert len({r.text for r in results}) == 1  # greedy: the same text three times
    assert events[-1].finish_reason is not None
    assert "default" in {p["id"] for p in probes}


def _env(server) -> dict:
    return {**os.environ, "STEER_URL": server.base_url, "STEER_API_KEY": API_KEY}


@pytest.mark.parametrize("argv, expect", [
    (["chat", "Give me a name for a cat.", "--typical-p", "0.9", "--entropy",
      "--max-tokens", "8"], "typical"),
    (["chat", "What is 17 times 3?", "--diffadapt", "default", "--max-tokens", "16"],
     "difficulty"),
    (["chat", "What is 2 + 2?", "--particles", "2", "--max-tokens", "16"], "particle steps"),
    (["complete", "Once upon a time", "--east", "explore:2", "--max-tokens", "8",
      "--no-stream"], "east"),
])
def test_generate_cli(server, argv, expect):
    done = subprocess.run([sys.executable, "-m", "clients.cli", *argv], env=_env(server),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and expect in done.stderr


def test_generate_cli_reports_errors(server):
    done = subprocess.run([sys.executable, "-m", "clients.cli", "chat", "hi", "--east",
                           "nothing"], env=_env(server), capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode != 0 and "no steering vector named 'nothing'" in done.stderr


@pytest.mark.parametrize("command", [
    [sys.executable, "examples/openai_sdk.py"],
    [sys.executable, "examples/openai_tools.py"],
    [sys.executable, "examples/client_example.py"],
    ["bash", "examples/curl.sh"],
])
def test_examples_run(server, command):
    done = subprocess.run(command, env=_env(server), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip()
