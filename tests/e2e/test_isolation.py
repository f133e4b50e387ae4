"""Every in-engine method keeps to its own rows: requests steered differently, and plain ones,
run in the same engine steps (counted from vLLM's step counter), and each one's
tokens, report and entropy lists equal its run alone. A method that read another row's
options (τ, vector, capture layer, V-Reason settings) or wrote another row's telemetry would
change some request's outcome here."""

from tests.e2e.batching import same, solo_and_together

MODEL = "SmolLM2-135M-Instruct"
TOKENS = 20
PROMPTS = ["The weather today is", "List three prime numbers:", "def add(a, b):",
           "In 1492, Columbus", "My favourite fruit is"]
ENTROPY = {"return_entropy": True}
KINDS = {  # name → the request's sampling and steering; seeded or greedy, so reproducible
    "plain greedy": {"temperature": 0},
    "plain sampled": {"temperature": 1.0, "seed": 11},
    "typical 0.3": {"temperature": 1.0, "seed": 12, "typical_p": 0.3,
                    "steering": ENTROPY},
    "typical 0.8": {"temperature": 1.0, "seed": 13, "typical_p": 0.8,
                    "steering": ENTROPY},
    "telemetry greedy": {"temperature": 0, "steering": ENTROPY},
    "telemetry T=0.7": {"temperature": 0.7, "seed": 14, "steering": ENTROPY},
    "east +6": {"temperature": 0, "steering": {
        "east": {"vector": "explore", "scale": 6.0}, **ENTROPY}},
    "east -6 all": {"temperature": 0, "steering": {
        "east": {"vector": "explore", "scale": -6.0, "positions": "all"}, **ENTROPY}},
    "capture 3+final": {"temperature": 0, "steering": {"return_hidden_states": [3, "final"]}},
    "capture 20": {"temperature": 0, "steering": {"return_hidden_states": [20]}},
    "vreason every 4": {"temperature": 0, "steering": {"vreason": {"every": 4}, **ENTROPY}},
    "vreason lr 0.2": {"temperature": 0, "steering": {
        "vreason": {"every": 3, "lr": 0.2, "positions": "context"}, **ENTROPY}},
    "gate entropy→T": {"temperature": 1.0, "seed": 15, "steering": {"gates": [
        {"signal": "entropy", "above": 2.5, "hold": 2, "then": {"temperature": 0.3}}],
        **ENTROPY}},
    "gate ema→east": {"temperature": 0, "steering": {"gates": [
        {"signal": "entropy_ema", "ema": 0.5, "below": 4.0,
         "then": {"east": {"vector": "explore", "scale": 6.0}}}], **ENTROPY}},
    "dynatemp 0.5": {"temperature": 0.8, "seed": 16, "steering": {"dynatemp": {"range": 0.5},
                                                                   **ENTROPY}},
}


def body(kind: str, prompt: str) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": TOKENS, "return_token_ids": True,
            **KINDS[kind]}


def test_every_method_keeps_to_its_rows_in_a_shared_batch(server):
    cases = [(kind, PROMPTS[i % len(PROMPTS)]) for i, kind in enumerate(KINDS)]
    solo, mixed = solo_and_together(server, [body(kind, prompt) for kind, prompt in cases])
    differences = {kind: d for (kind, _), a, b in zip(cases, solo, mixed)
                   if (d := same(a, b))}
    assert not differences, differences
    reports = {kind: o["steering"] for (kind, _), o in zip(cases, solo)}
    assert reports["capture 3+final"]["hidden_states"].keys() == {"3", "final"}
    assert reports["capture 20"]["hidden_states"].keys() == {"20"}
    assert reports["vreason every 4"]["vreason"]["updates"]
    assert reports["vreason lr 0.2"]["vreason"]["updates"]
    assert reports["gate entropy→T"]["gates"]["gates"][0]["fired"]
    assert reports["gate ema→east"]["gates"]["east_tokens"]
    for kind in KINDS:
        if "token_entropy" in reports[kind]:
            assert None not in reports[kind]["token_entropy"], kind
