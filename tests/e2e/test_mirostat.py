"""Mirostat v2 on the real engine in compiled mode with the bundled model: μ and the kept tokens
at every generated token are a reference's run token by token in plain Python over HF's logits
of the same prefix; τ = 0 is greedy; it composes with EAST (each side checked) and keeps to its
rows in a shared batch; llama.cpp's fields are the same; what it cannot combine with is a 400;
it counts in the metrics. Its μ surviving batch moves, swaps and preemption is unit-tested
(tests/unit/test_mirostat.py): this engine does not preempt at this load."""

import math

import pytest

from tests.e2e.batching import same, solo_and_together
from tests.e2e.test_gates import hf_logits
from tests.e2e.test_metrics import Increments

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "Once upon a time"
MARGIN = 1e-3  # bits: HF's and vLLM-CPU's float32 logits differ by about 1e-5


def complete(http, **body) -> dict:
    response = http.post("/v1/completions", json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 24, "return_token_ids": True, **body})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def mirostat(tau: float = 5.0, eta: float = 0.1, **steering) -> dict:
    return {"mirostat": {"tau": tau, "eta": eta}, **steering}


def reference_run(logits, tokens: list[int], tau: float, eta: float, temperature: float):
    """Algorithm 2 token by token in plain Python floats over each position's logits: per token
    μ, the kept tokens and the ambiguous ones (surprise within the margin of μ: either
    implementation's rounding may keep them)."""
    mu, out = 2 * tau, []
    for row, token in zip(logits, tokens):
        scaled = [x / temperature for x in row.tolist()]
        top = max(scaled)
        weights = [math.exp(x - top) for x in scaled]
        total = sum(weights)
        surprise = [-math.log2(w / total) for w in weights]
        kept = {i for i, s in enumerate(surprise) if s <= mu} or {max(
            range(len(surprise)), key=lambda i: -surprise[i])}
        near = {i for i, s in enumerate(surprise) if abs(s - mu) < MARGIN}
        out.append((mu, kept, near))
        mass = sum(weights[i] for i in kept)
        mu -= eta * (-math.log2(weights[token] / mass) - tau)
    return out


@pytest.mark.parametrize("tau,eta,temperature", [(3.0, 0.2, 1.0), (5.0, 0.5, 0.8)])
def test_mu_and_the_kept_tokens_follow_a_reference_token_by_token(http, hf_model, tau, eta,
                                                                   temperature):
    choice = complete(http, temperature=temperature, seed=11, max_tokens=32, ignore_eos=True,
                      steering=mirostat(tau, eta, return_entropy=True))
    report = choice["steering"]["mirostat"]
    tokens, prompt = choice["token_ids"], choice["prompt_token_ids"]
    logits = hf_logits(hf_model, prompt + tokens)[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    assert len(report["mu"]) == len(report["kept"]) == len(tokens) == 32
    for k, (mu, kept, near) in enumerate(reference_run(logits, tokens, tau, eta, temperature)):
        assert report["mu"][k] == pytest.approx(mu, abs=1e-2), k
        assert tokens[k] in kept | near, k  # sampled from what it kept
        surely = len(kept - near)
        assert surely <= report["kept"][k] <= surely + len(near), k
    assert len(set(report["kept"])) > 1 and min(report["mu"]) != max(report["mu"])  # it acted


def test_tau_zero_is_greedy_and_composes_with_east(http):
    greedy = complete(http, temperature=0)["token_ids"]
    assert complete(http, temperature=1.5, seed=3)["token_ids"] != greedy  # it would sample
    assert complete(http, temperature=1.5, seed=3, steering=mirostat(0.0))["token_ids"] == greedy
    east = {"east": {"vector": "explore", "scale": 6.0}}
    steered_greedy = complete(http, temperature=0, steering=east)["token_ids"]
    assert steered_greedy != greedy  # EAST changes it
    both = complete(http, temperature=1.3, seed=2, steering=mirostat(0.0, **east))
    assert both["token_ids"] == steered_greedy
    assert both["steering"]["methods"] == ["east", "mirostat"]


def test_llama_cpps_fields_are_the_same_and_zero_is_off(http):
    steered = complete(http, temperature=1.0, seed=5, steering=mirostat(2.0, 0.3))["token_ids"]
    alias = complete(http, temperature=1.0, seed=5, mirostat=2, mirostat_tau=2.0,
                     mirostat_eta=0.3)
    assert alias["token_ids"] == steered and alias["steering"]["mirostat"] == {
        "tau": 2.0, "eta": 0.3}
    sampled = complete(http, temperature=1.0, seed=5)["token_ids"]
    assert steered != sampled  # it changed the draw
    assert complete(http, temperature=1.0, seed=5, mirostat=0,
                    mirostat_tau=2.0)["token_ids"] == sampled


def test_each_choice_and_each_row_keeps_its_own_mu(http, server):
    choices = http.post("/v1/completions", json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 16, "n": 2, "seed": 8,
        "temperature": 1.0, "steering": mirostat(2.5, 0.4, return_entropy=True)}).json()["choices"]
    assert choices[0]["steering"]["mirostat"]["mu"][0] == choices[1]["steering"]["mirostat"][
        "mu"][0] == 5.0
    assert choices[0]["text"] != choices[1]["text"]
    kinds = [{"temperature": 1.0, "seed": 31, "steering": mirostat(3.0, 0.3,
                                                                   return_entropy=True)},
             {"temperature": 1.0, "seed": 31},
             {"temperature": 0.9, "seed": 32, "steering": mirostat(6.0, 1.0)},
             {"temperature": 1.0, "seed": 33, "typical_p": 0.4},
             {"temperature": 0}]
    bodies = [{"model": MODEL, "prompt": prompt, "max_tokens": 20, "return_token_ids": True,
               **kind} for prompt, kind in zip(["Once upon a time", "Once upon a time",
                                                "The weather today is", "def add(a, b):",
                                                "My favourite fruit is"], kinds)]
    solo, together = solo_and_together(server, bodies)
    assert [d for a, b in zip(solo, together) if (d := same(a, b))] == []
    assert solo[0]["token_ids"] != solo[1]["token_ids"]


@pytest.mark.parametrize("body,param", [
    ({"top_k": 5, "steering": mirostat()}, "top_k"),
    ({"top_p": 0.9, "steering": mirostat()}, "top_p"),
    ({"min_p": 0.1, "mirostat": 2}, "min_p"),
    ({"typical_p": 0.9, "steering": mirostat()}, "steering.mirostat"),
    ({"steering": mirostat(top_nsigma={"n": 1.0})}, "steering.mirostat"),
    ({"steering": mirostat(dynatemp={"range": 0.5})}, "steering.mirostat"),
    ({"steering": mirostat(particles={"n": 2})}, "steering.particles"),
    ({"mirostat": 1}, "mirostat"),
    ({"mirostat": 2, "steering": mirostat()}, None),
    ({"steering": mirostat(tau=-1.0)}, "steering.mirostat.tau"),
    ({"mirostat_eta": "0.1", "mirostat": 2}, "mirostat_eta"),
])
def test_what_it_cannot_do_is_a_400_naming_the_field(http, body, param):
    response = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_it_counts_in_the_metrics(http):
    with Increments(http) as added:
        choice = complete(http, temperature=1.0, seed=9, max_tokens=16, mirostat=2)
    assert added("steer_mirostat_mu_bits_count") == len(choice["token_ids"])
    assert added("steer_requests_total", method="mirostat") == 1
