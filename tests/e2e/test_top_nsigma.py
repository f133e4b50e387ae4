"""Top-nσ on the real engine in compiled mode with the bundled model: n = 0 is greedy at any
temperature; the tokens it keeps are the paper's rule on HF's logits of the same prefix; it
composes with typical sampling, EAST and the gates (each side checked); it keeps to its rows in
a shared batch; llama.cpp's `top_n_sigma` is the same; bad values are 400s; it counts in the
metrics; the playground offers it from the schema alone."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TypicalLogitsWarper

from tests.e2e.batching import same, solo_and_together
from tests.e2e.test_gates import hf_logits
from tests.e2e.test_metrics import Increments

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The weather today is"
MARGIN = 1e-3  # HF's and vLLM-CPU's float32 logits differ by about 1e-5


def complete(http, **body) -> dict:
    response = http.post("/v1/completions", json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 24, "return_token_ids": True, **body})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def nsigma(n: float, **steering) -> dict:
    return {"top_nsigma": {"n": n}, **steering}


def test_n_zero_is_greedy_at_any_temperature(http, openai_client):
    greedy = complete(http, temperature=0)["token_ids"]
    assert complete(http, temperature=1.5, seed=3)["token_ids"] != greedy  # it would sample
    for temperature in (0.7, 1.5):
        assert complete(http, temperature=temperature, seed=3,
                        steering=nsigma(0))["token_ids"] == greedy
        assert complete(http, temperature=temperature, seed=3,
                        top_n_sigma=0)["token_ids"] == greedy  # llama.cpp's field
    chat = [{"role": "user", "content": "Name a colour."}]
    plain = openai_client.chat.completions.create(model=MODEL, messages=chat, max_tokens=12,
                                                  temperature=0)
    steered = openai_client.chat.completions.create(
        model=MODEL, messages=chat, max_tokens=12, temperature=1.8, seed=4,
        extra_body={"steering": nsigma(0)})
    assert steered.choices[0].message.content == plain.choices[0].message.content


def reference_kept(row: torch.Tensor, n: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper's rule in float64 on one row of logits: the kept tokens, and those within the
    margin of the cut (either side may keep them)."""
    x = row.double().numpy()
    cut = x.max() - n * x.std()
    return x >= cut, np.abs(x - cut) < MARGIN


def test_the_kept_tokens_are_the_papers_rule_on_hf_logits(http, hf_model):
    choice = complete(http, temperature=1.0, seed=5, max_tokens=32, ignore_eos=True,
                      steering=nsigma(1.0, return_entropy=True))
    kept = choice["steering"]["top_nsigma"]["kept"]
    tokens = choice["token_ids"]
    prompt = choice["prompt_token_ids"]
    logits = hf_logits(hf_model, prompt + tokens)[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    assert len(kept) == len(tokens) == 32
    for k, (row, token) in enumerate(zip(logits, tokens)):
        want, near = reference_kept(row, 1.0)
        assert want[token] or near[token], k  # the sampled token was in the kept set
        surely = int((want & ~near).sum())  # kept by either implementation's rounding
        assert surely <= kept[k] <= surely + int(near.sum()), k
    assert max(kept) > 1  # a real truncation, not greedy


@pytest.mark.parametrize("n,p,narrower", [(3.0, 0.2, "typical"), (0.5, 0.95, "top_nsigma")])
def test_with_typical_every_token_lies_in_both_sets(http, hf_model, n, p, narrower):
    """vLLM's order: top-nσ, then typical sampling on what it kept. With one of the two much
    narrower than the other, a sampled token outside it shows that side was dropped."""
    choice = complete(http, temperature=1.0, seed=7, max_tokens=32, ignore_eos=True,
                      typical_p=p, steering=nsigma(n))
    tokens, prompt = choice["token_ids"], choice["prompt_token_ids"]
    logits = hf_logits(hf_model, prompt + tokens)[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    narrower_count = 0
    for k, (row, token) in enumerate(zip(logits, tokens)):
        in_nsigma, near = reference_kept(row, n)
        masked = row.masked_fill(~torch.from_numpy(in_nsigma), -torch.inf)
        typical = TypicalLogitsWarper(p)(None, masked[None])[0]
        in_both = torch.isfinite(typical).numpy()
        assert in_both[token] or near[token], k
        narrower_count += int((in_both.sum() < in_nsigma.sum()) == (narrower == "typical"))
    assert narrower_count >= len(tokens) // 2  # the narrower side really bound


def test_with_east_n_zero_gives_the_steered_greedy_answer(http):
    east = {"east": {"vector": "explore", "scale": 6.0}}
    steered_greedy = complete(http, temperature=0, steering=east)["token_ids"]
    assert steered_greedy != complete(http, temperature=0)["token_ids"]  # EAST changes it
    both = complete(http, temperature=1.3, seed=2, steering=nsigma(0, **east))
    assert both["token_ids"] == steered_greedy
    assert both["steering"]["methods"] == ["east", "top_nsigma"]


def test_a_gate_switches_it_on_and_a_gated_rows_own_n_stays_in_its_chain(http):
    greedy = complete(http, temperature=0)["token_ids"]
    sampled = complete(http, temperature=1.5, seed=3)["token_ids"]
    always = {"signal": "entropy", "above": -1.0, "then": {"top_nsigma": 0}}
    never = {"signal": "entropy", "above": 1e9, "then": {"top_nsigma": 0}}
    on = complete(http, temperature=1.5, seed=3, steering={"gates": [always]})
    assert on["token_ids"] == greedy
    assert on["steering"]["gates"]["gates"][0]["held"] == list(range(len(greedy)))
    assert complete(http, temperature=1.5, seed=3,
                    steering={"gates": [never]})["token_ids"] == sampled
    own = complete(http, temperature=1.5, seed=3, steering=nsigma(0, gates=[never]))
    assert own["token_ids"] == greedy  # the gate processor applies the row's own n


def test_it_keeps_to_its_rows_in_a_shared_batch(server):
    kinds = [{"temperature": 1.2, "seed": 21, "steering": nsigma(0.8, return_entropy=True)},
             {"temperature": 1.2, "seed": 21},
             {"temperature": 1.0, "seed": 22, "typical_p": 0.5},
             {"temperature": 1.4, "seed": 23, "top_n_sigma": 0.0},
             {"temperature": 0, "steering": {"east": {"vector": "explore", "scale": 6.0}}}]
    bodies = [{"model": MODEL, "prompt": prompt, "max_tokens": 20, "return_token_ids": True,
               **kind} for prompt, kind in zip(["The weather today is", "The weather today is",
                                                "List three prime numbers:", "In 1492, Columbus",
                                                "My favourite fruit is"], kinds)]
    solo, together = solo_and_together(server, bodies)
    assert [d for a, b in zip(solo, together) if (d := same(a, b))] == []
    assert solo[0]["token_ids"] != solo[1]["token_ids"]  # same seed: top-nσ changed the draw


def test_a_negative_alias_is_off_and_bad_values_are_400s(http):
    sampled = complete(http, temperature=1.5, seed=3)["token_ids"]
    assert complete(http, temperature=1.5, seed=3, top_n_sigma=-1)["token_ids"] == sampled
    for body, param in (({"steering": {"top_nsigma": {"n": -0.5}}}, "steering.top_nsigma.n"),
                        ({"steering": {"top_nsigma": {"n": "1"}}}, "steering.top_nsigma.n"),
                        ({"top_n_sigma": "1"}, "top_n_sigma"),
                        ({"steering": {"gates": [{"signal": "entropy", "above": 1, "then": {
                            "top_nsigma": -2}}]}}, "steering.gates.0.then.top_nsigma")):
        response = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **body})
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    both = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4,
                                               "top_n_sigma": 1, "steering": nsigma(1)})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]


def test_it_counts_in_the_metrics(http):
    with Increments(http) as added:
        choice = complete(http, temperature=1.0, seed=9, max_tokens=16, steering=nsigma(1.5))
    tokens = len(choice["token_ids"])
    assert added("steer_top_nsigma_kept_tokens_count") == tokens
    assert added("steer_requests_total", method="top_nsigma") == 1
    assert added("steer_token_entropy_nats_count", method="top_nsigma") == tokens
