"""Entropy gates and dynamic temperature in the real engine (vLLM's default compiled mode, the
bundled model), each against an exact expectation: a gate that never fires samples what the
ungated request samples, one that always fires samples what its action alone samples, the
reported firings are exactly the tokens whose reported signal met the condition, and a gate's
EAST vector steers exactly the forward passes after a firing."""

import math

import pytest
import torch

from steering.entropy import entropy_varentropy
from tests.prometheus import metric

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "Once upon a time, in a quiet village by the sea,"
TOKENS = 24
VOCAB = 49152  # the bundled model's: every logit is finite when nothing masks tokens
NEVER = {"signal": "entropy", "above": 1e6}  # entropy is at most log(VOCAB) < 11 nats
ALWAYS = {"signal": "entropy", "above": -1.0}


def complete(http, prompt=PROMPT, **body) -> dict:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt,
                                           "max_tokens": TOKENS, "return_token_ids": True,
                                           "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def steering(choice) -> dict:
    return choice["steering"]


@pytest.mark.parametrize("sampling", [
    {"temperature": 0},
    {"temperature": 0.8, "seed": 5},
    {"temperature": 1.0, "seed": 6, "top_k": 20, "min_p": 0.02},
    {"temperature": 0.9, "seed": 7, "typical_p": 0.7, "top_p": 0.9},
])
def test_a_gate_that_never_fires_samples_what_the_ungated_request_samples(http, sampling):
    plain = complete(http, **sampling)
    gated = complete(http, **sampling, steering={
        "gates": [{**NEVER, "then": {"temperature": 0.1}}], "return_entropy": True})
    assert gated["token_ids"] == plain["token_ids"]
    report = steering(gated)["gates"]
    assert report == {"gates": [{"signal": "entropy", "then": {"temperature": 0.1},
                                 "fired_count": 0, "fired": [], "values": [], "held": []}],
                      "east_tokens": []}


def test_the_signal_is_the_reported_entropy_at_temperature_1(http):
    """A greedy request's entropy report is already at T = 1: gated or not, same numbers."""
    plain = complete(http, temperature=0, steering={"return_entropy": True})
    gated = complete(http, temperature=0, steering={
        "gates": [{**NEVER, "then": {"top_k": 3}}], "return_entropy": True})
    assert gated["token_ids"] == plain["token_ids"]
    assert gated["steering"]["token_entropy"] == pytest.approx(
        plain["steering"]["token_entropy"], abs=1e-4)


def test_a_gate_that_always_fires_samples_what_its_action_samples(http):
    """Temperature 0 while the gate holds: a T = 1.3 seeded request becomes the greedy one,
    from its first token (a sampling action acts on the token that fired the gate)."""
    greedy = complete(http, temperature=0)
    gated = complete(http, temperature=1.3, seed=3, steering={
        "gates": [{**ALWAYS, "then": {"temperature": 0}}]})
    assert gated["token_ids"] == greedy["token_ids"]
    assert steering(gated)["gates"]["gates"][0]["fired"] == list(range(TOKENS))
    top_k = complete(http, temperature=1.0, seed=9, steering={
        "gates": [{**ALWAYS, "then": {"top_k": 1}}]})
    assert top_k["token_ids"] == greedy["token_ids"]


def test_firings_and_holds_are_exactly_the_tokens_the_reported_signal_says(http):
    """Gate 0 on the entropy, gate 1 on a band of the varentropy, gate 2 on the entropy's EMA
    (c = 0.5): each fires exactly where the reported per-token values meet its condition and
    holds `hold` tokens (left_i = hold if fired else max(left_{i-1} - 1, 0))."""
    gates = [{"signal": "entropy", "above": 3.0, "hold": 3, "then": {"temperature": 0.5}},
             {"signal": "varentropy", "above": 2.0, "below": 8.0, "then": {"min_p": 0.1}},
             {"signal": "entropy_ema", "ema": 0.5, "below": 2.5, "hold": 2,
              "then": {"typical_p": 0.9}}]
    choice = complete(http, temperature=1.0, seed=21, max_tokens=48,
                      steering={"gates": gates, "return_entropy": True})
    h = choice["steering"]["token_entropy"]
    v = choice["steering"]["token_varentropy"]
    ema = []
    for x in h:
        ema.append(x if not ema else 0.5 * ema[-1] + 0.5 * x)
    conditions = [[x > 3.0 for x in h], [2.0 < x < 8.0 for x in v], [x < 2.5 for x in ema]]
    report = choice["steering"]["gates"]["gates"]
    signals = [h, v, ema]
    for gate, condition, hold, signal in zip(report, conditions, (3, 1, 2), signals):
        assert gate["fired"] == [i for i, c in enumerate(condition) if c]
        assert gate["fired_count"] == len(gate["fired"])
        assert gate["values"] == pytest.approx([signal[i] for i in gate["fired"]], rel=1e-5)
        left, held = 0, []
        for i, c in enumerate(condition):
            left = hold if c else max(left - 1, 0)
            if left:
                held.append(i)
        assert gate["held"] == held
    assert all(report[g]["fired"] for g in range(3)), report  # the prompt exercises each gate


def test_the_first_gate_that_holds_wins_and_a_gate_beats_dynamic_temperature(http):
    greedy = complete(http, temperature=0)
    first_greedy = complete(http, temperature=1.0, seed=4, steering={"gates": [
        {**ALWAYS, "then": {"temperature": 0}}, {**ALWAYS, "then": {"temperature": 1.5}}]})
    assert first_greedy["token_ids"] == greedy["token_ids"]
    first_hot = complete(http, temperature=1.0, seed=4, steering={"gates": [
        {**ALWAYS, "then": {"temperature": 1.5}}, {**ALWAYS, "then": {"temperature": 0}}]})
    hot = complete(http, temperature=1.5, seed=4)
    assert first_hot["token_ids"] == hot["token_ids"] != greedy["token_ids"]
    over_dynatemp = complete(http, temperature=1.0, seed=4, steering={
        "dynatemp": {"range": 0.9}, "gates": [{**ALWAYS, "then": {"temperature": 0}}]})
    assert over_dynatemp["token_ids"] == greedy["token_ids"]
    assert set(steering(over_dynatemp)["dynatemp"]["temperatures"]) == {0.0}


def test_dynamic_temperature_follows_llama_cpps_formula_on_the_reported_entropy(http):
    choice = complete(http, temperature=0.8, seed=8, steering={
        "dynatemp": {"range": 0.5, "exponent": 2.0}, "return_entropy": True})
    report = steering(choice)
    low, high = 0.3, 1.3
    want = [low + (high - low) * (h / math.log(VOCAB)) ** 2.0 for h in report["token_entropy"]]
    assert report["dynatemp"]["temperatures"] == pytest.approx(want, rel=1e-4)
    assert report["dynatemp"]["range"] == 0.5 and "dynatemp" in report["methods"]


def test_dynamic_temperature_with_range_0_is_plain_sampling(http):
    plain = complete(http, temperature=0.9, seed=12, top_k=40)
    dynamic = complete(http, temperature=0.9, seed=12, top_k=40,
                       steering={"dynatemp": {"range": 0}})
    assert dynamic["token_ids"] == plain["token_ids"]


def test_a_gates_vector_steers_the_forward_passes_after_a_firing(http):
    """An always-firing gate with EAST: token 0 comes from the unsteered prompt, so it is the
    plain greedy token t0; every later token is what plain EAST ("generated" positions: from
    the last prompt token on) gives for the prompt extended by t0."""
    east = {"vector": "explore", "scale": 8.0}
    plain = complete(http, temperature=0)
    gated = complete(http, temperature=0, steering={"gates": [{**ALWAYS, "then": {"east": east}}]})
    prompt_ids = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    t0 = plain["token_ids"][0]
    steered = complete(http, prompt=prompt_ids + [t0], max_tokens=TOKENS - 1, temperature=0,
                       steering={"east": east})
    assert gated["token_ids"][0] == t0
    assert gated["token_ids"][1:] == steered["token_ids"]
    assert gated["token_ids"] != plain["token_ids"]  # the vector changed something
    assert steering(gated)["gates"]["east_tokens"] == list(range(1, TOKENS))


def test_a_gates_vector_is_off_when_it_does_not_fire(http):
    plain = complete(http, temperature=0)
    gated = complete(http, temperature=0, steering={"gates": [
        {**NEVER, "then": {"east": {"vector": "explore", "scale": 8.0}}}]})
    assert gated["token_ids"] == plain["token_ids"]
    assert steering(gated)["gates"]["east_tokens"] == []


def test_gate_firings_are_counted_by_action(http, server):
    def fired(action):
        return metric(http.get("/metrics").text, "steer_gate_fired_tokens_total",
                      action=action)
    before = {a: fired(a) for a in ("temperature", "top_k", "east")}
    complete(http, temperature=1.0, seed=1, steering={"gates": [
        {**ALWAYS, "then": {"temperature": 0.7, "top_k": 50}},
        {**ALWAYS, "then": {"east": {"vector": "explore", "scale": 1.0}}}]})
    assert {a: fired(a) - before[a] for a in before} == {a: TOKENS for a in before}


def test_chat_and_streaming_carry_the_gates_report(openai_client):
    stream = openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8,
        temperature=0, stream=True,
        extra_body={"steering": {"gates": [{**ALWAYS, "then": {"top_k": 1}}]}})
    chunks = [c.model_dump() for c in stream]
    reports = [c["choices"][0].get("steering") for c in chunks if c["choices"]]
    final = [r for r in reports if r and "gates" in r]
    assert final and final[-1]["gates"]["gates"][0]["fired"], reports


@pytest.mark.parametrize("gates, param", [
    ([{"signal": "entropy", "then": {"temperature": 0.5}}], "steering.gates.0"),
    ([{"signal": "entropy", "above": 3, "below": 2, "then": {"temperature": 0.5}}],
     "steering.gates.0"),
    ([{"signal": "entropy", "ema": 0.5, "above": 1, "then": {"temperature": 0.5}}],
     "steering.gates.0"),
    ([{"signal": "entropy", "above": 1, "then": {}}], "steering.gates.0.then"),
    ([{"signal": "entropy", "above": 1, "hold": 0, "then": {"top_k": 2}}],
     "steering.gates.0.hold"),
    ([{"signal": "surprise", "above": 1, "then": {"top_k": 2}}], "steering.gates.0.signal"),
    ([{**ALWAYS, "then": {"top_k": 2}}] * 5, "steering.gates"),
])
def test_malformed_gates_are_a_400_naming_the_field(http, gates, param):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                           "steering": {"gates": gates}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()


def test_a_gates_unknown_vector_is_a_404(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                           "steering": {"gates": [{**ALWAYS, "then": {
                                               "east": {"vector": "nope"}}}]}})
    assert r.status_code == 404 and r.json()["error"]["param"] == \
        "steering.gates.0.then.east.vector", r.text


def test_each_particles_steps_are_gated(http):
    """Temperature 0 on every token of every step: the T = 1.5 particles all decode greedily,
    so they are one and the same text."""
    choice = complete(http, temperature=1.5, seed=2, max_tokens=16, steering={
        "particles": {"n": 3, "max_steps": 2, "return_particles": True},
        "gates": [{**ALWAYS, "then": {"temperature": 0}}]})
    texts = {p["text"] for p in choice["steering"]["particles"]["particles"]}
    assert len(texts) == 1, texts
    ungated = complete(http, temperature=1.5, seed=2, max_tokens=16, steering={
        "particles": {"n": 3, "max_steps": 2, "return_particles": True}})
    assert len({p["text"] for p in ungated["steering"]["particles"]["particles"]}) > 1


def test_a_grammar_still_binds_a_gated_request(http):
    """vLLM applies the structured-output mask before any logits processor: a gate that heats
    every token to T = 2 still only ever picks an allowed continuation."""
    for seed in range(3):
        choice = complete(http, prompt="My favourite colour is", temperature=1.0, seed=seed,
                          max_tokens=8, ignore_eos=False,
                          structured_outputs={"choice": ["red", "green", "blue"]},
                          steering={"gates": [{**ALWAYS, "then": {"temperature": 2.0}}]})
        assert choice["text"] in {"red", "green", "blue"}
        assert choice["steering"]["gates"]["gates"][0]["fired"]


def test_gates_combine_with_diffadapt_and_typical(http):
    r = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "What is 2 + 3?"}],
        "max_tokens": 16, "seed": 1, "typical_p": 0.9,
        "steering": {"diffadapt": {"probe": "default"}, "dynatemp": {"range": 0.3},
                     "gates": [{"signal": "entropy", "above": 1.0, "then": {"top_k": 5}}]}})
    assert r.status_code == 200, r.text
    report = r.json()["choices"][0]["steering"]
    assert report["methods"] == ["diffadapt", "dynatemp", "gates", "typical"]
    strategy = report["diffadapt"]["strategy"]["temperature"]
    temperatures = report["dynatemp"]["temperatures"]  # around DiffAdapt's chosen temperature
    assert temperatures and all(max(0, strategy - 0.3) - 1e-6 <= t <= strategy + 0.3 + 1e-6
                                for t in temperatures)


def hf_logits(hf_model, token_ids: list[int], steer=None) -> torch.Tensor:
    """HF's logits at every position of `token_ids`; `steer` = (vector, scale, layer,
    positions) adds scale * vector to that layer's output at those positions only."""
    model, _ = hf_model
    hook = None
    if steer is not None:
        vector, scale, layer, positions = steer

        def add(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            hidden[0, positions] += scale * vector
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        hook = model.model.layers[layer].register_forward_hook(add)
    try:
        with torch.no_grad():
            return model(torch.tensor([token_ids])).logits[0]
    finally:
        if hook is not None:
            hook.remove()


def test_dynamic_temperature_matches_llama_cpps_formula_on_hf_logits(http, hf_model):
    """Each token's temperature, from HF's entropy of the same prefix (teacher-forced)."""
    choice = complete(http, temperature=0.7, seed=31, max_tokens=16,
                      steering={"dynatemp": {"range": 0.4, "exponent": 1.5}})
    prompt_ids = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    logits = hf_logits(hf_model, prompt_ids + choice["token_ids"])
    low, high = 0.3, 1.1
    want = []
    for k in range(len(choice["token_ids"])):
        h = float(entropy_varentropy(logits[len(prompt_ids) - 1 + k][None])[0][0])
        want.append(low + (high - low) * (h / math.log(VOCAB)) ** 1.5)
    assert steering(choice)["dynatemp"]["temperatures"] == pytest.approx(want, rel=2e-3)


def test_a_gates_vector_steers_exactly_the_reported_tokens_as_hf_does(http, hf_model):
    """A gate that fires on some tokens only: HF with the vector added at exactly the positions
    whose forward passes the report names (token k is steered: the pass over token k - 1, at
    position prompt + k - 1) predicts every greedy token the engine produced."""
    explore = http.get("/v1/steering/vectors/explore", params={"include_values": True}).json()
    east = {"vector": "explore", "scale": 6.0}
    choice = complete(http, temperature=0, max_tokens=32, steering={"gates": [
        {"signal": "entropy", "below": 1.5, "then": {"east": east}}]})
    steered = steering(choice)["gates"]["east_tokens"]
    tokens = choice["token_ids"]
    assert 0 < len(steered) < len(tokens) - 1, steered  # some tokens steered, not all
    prompt_ids = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    n = len(prompt_ids)
    logits = hf_logits(hf_model, prompt_ids + tokens, (
        torch.tensor(explore["values"]), 6.0, explore["layer"], [n + k - 1 for k in steered]))
    assert logits[n - 1:n - 1 + len(tokens)].argmax(-1).tolist() == tokens
