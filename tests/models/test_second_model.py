"""The experiments' second model, fetched and served with the project's own commands (`make
test-models`: not part of `make test`, whose first run must stay fast): served under its name
with its shipped vector, V-Reason equal to the HF reference on it in compiled mode, every
method answering with its report and acting, and tool calls through its Hermes template."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from clients.bench.local_server import steer_server
from server.models import CATALOG, fetch
from tests import vreason_reference

pytestmark = pytest.mark.models
NAME = "Qwen2.5-Coder-0.5B-Instruct"
QUESTION = "What is 17 + 25? Think step by step."
ALWAYS = {"signal": "entropy", "above": -1.0}


@pytest.fixture(scope="module")
def folder():
    return fetch(CATALOG[NAME])  # converts once; a no-op when the cache has it


@pytest.fixture(scope="module")
def http(folder, tmp_path_factory):
    server = steer_server(tmp_path_factory.mktemp("qwen") / "server.log", "--model", NAME)
    with httpx.Client(base_url=server.base_url, timeout=900) as client:
        yield client
    server.stop()


def chat(http, steering: dict | None = None, max_tokens: int = 24, **body) -> dict:
    """A greedy answer to QUESTION unless `body` says otherwise (None leaves a field out)."""
    fields = {"model": NAME, "messages": [{"role": "user", "content": QUESTION}],
              "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
              **({"steering": steering} if steering else {}), **body}
    reply = http.post("/v1/chat/completions",
                      json={k: v for k, v in fields.items() if v is not None})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_served_under_its_name_with_its_own_vector(http):
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [NAME]
    vector = http.get("/v1/steering/vectors/bandit").json()
    assert (vector["layer"], vector["hidden_size"]) == (12, 896)


def test_vreason_equals_the_hf_reference_on_this_model(http, folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = AutoTokenizer.from_pretrained(folder).eos_token_id
    served = chat(http, {"return_entropy": True,
                         "vreason": {"every": 4, "steps": 2, "lr": 0.05}}, max_tokens=32)
    choice = served["choices"][0]
    reference = vreason_reference.generate(model, choice["prompt_token_ids"], 32, 4, 2, 0.05,
                                           0.9, "prompt", eos=eos)
    vreason_reference.assert_served_equals(choice["token_ids"],
                                           choice["steering"]["vreason"]["updates"], reference)


@pytest.mark.parametrize("steering, acted", [
    ({"typical": {"p": 0.5}}, lambda report: report["typical"]),
    ({"gates": [{**ALWAYS, "then": {"top_k": 1}}]},
     lambda report: report["gates"]["gates"][0]["fired"] == list(range(24))),
    ({"dynatemp": {"range": 0.5}}, lambda report: report["dynatemp"]),
    ({"top_nsigma": {"n": 1.0}}, lambda report: report["top_nsigma"]),
    ({"mirostat": {"tau": 3.0}}, lambda report: report["mirostat"]),
    ({"particles": {"n": 2, "max_steps": 2}},
     lambda report: len(report["particles"]["final_scores"]) == 2),
    ({"deepconf": {"budget": 3, "warmup": 2, "window": 4}},  # online: may stop on consensus
     lambda report: 2 <= len(report["deepconf"]["traces"]) <= 3),
    ({"diffadapt": {"probe": "paper"}},  # the probe shipped for this model
     lambda report: report["diffadapt"]["recipe"] == "paper"
     and abs(sum(report["diffadapt"]["probabilities"].values()) - 1) < 1e-5),
])
def test_each_method_answers_with_its_report(http, steering, acted):
    # DiffAdapt sets the temperature from the difficulty class: a request's own is refused
    temperature = None if "diffadapt" in steering else 0.7
    choice = chat(http, steering, temperature=temperature, seed=1)["choices"][0]
    report = choice["steering"]
    assert report["methods"] == list(steering) and acted(report), report


def test_the_shipped_vector_steers_and_hidden_states_have_its_width(http):
    plain = chat(http)["choices"][0]
    steered = chat(http, {"east": {"vector": "bandit", "scale": 2.0},
                          "return_hidden_states": ["final"]})["choices"][0]
    assert steered["token_ids"] != plain["token_ids"]
    final = torch.tensor(steered["steering"]["hidden_states"]["final"])
    assert final.shape[-1] == 896 and torch.isfinite(final).all()


def test_a_required_tool_call_through_its_hermes_template(http):
    tool = {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                        "b": {"type": "integer"}},
                       "required": ["a", "b"]}}}
    reply = chat(http, max_tokens=64, tools=[tool], tool_choice="required")
    call = reply["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "add" and set(json.loads(call["arguments"])) == {"a", "b"}
