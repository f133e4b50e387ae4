"""DeepConf on the real engine in compiled mode with the bundled model: each trace's
confidence is HF's top-k log-probabilities of the same tokens; each trace is the plain request
with its seed (steered as the request says); a vote with `keep: 1` and no weights is plain
majority voting; an impossible bar cuts every trace at its first full window and a bar of 0
cuts none (the tokens are offline's); streaming; other requests in the same engine steps are
unchanged; what it cannot honour is a 400; its metrics count."""

import json
from collections import Counter

import pytest
import torch

from steering.methods.deepconf.core import group_confidences, last_number
from tests.e2e.batching import same, solo_and_together
from tests.e2e.test_gates import hf_logits
from tests.e2e.test_metrics import Increments

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
SAMPLING = {"temperature": 0.9, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
            "repetition_penalty": 1.0, "seed": 40, "max_tokens": 24}


def complete(http, deepconf=None, status=200, **body) -> dict:
    steering = {**({"deepconf": deepconf} if deepconf is not None else {}),
                **body.pop("steering", {})}
    response = http.post("/v1/completions", json={
        "model": MODEL, "prompt": PROMPT, "return_token_ids": True, **SAMPLING, **body,
        **({"steering": steering} if steering else {})})
    assert response.status_code == status, response.text
    return response.json()


def traces_of(body: dict) -> list[dict]:
    return body["choices"][0]["steering"]["deepconf"]["traces"]


GATE = {"signal": "entropy", "above": 1.0, "then": {"temperature": 0.2, "top_k": 3}}


@pytest.mark.parametrize("steering,methods", [
    ({"typical_p": 0.8, "steering": {"east": {"vector": "explore", "scale": 4.0}}},
     ["deepconf", "east", "typical"]),
    ({"steering": {"gates": [GATE]}}, ["deepconf", "gates"]),
])
def test_each_trace_is_the_plain_request_with_its_seed_and_keep_1_unweighted_is_majority(
        http, steering, methods):
    budget = 5
    body = complete(http, {"mode": "offline", "budget": budget, "keep": 1.0, "weighted": False},
                    n=budget, **steering)
    choices = body["choices"]
    plain = [complete(http, **{**steering, "seed": SAMPLING["seed"] + i})["choices"][0]
             for i in range(budget)]
    unsteered = [complete(http, seed=SAMPLING["seed"] + i)["choices"][0] for i in range(budget)]
    assert [p["token_ids"] for p in plain] != [u["token_ids"] for u in unsteered]  # it acts
    report = choices[0]["steering"]
    assert report["methods"] == methods
    by_index = {c["steering"]["deepconf"]["chosen"]: c for c in choices}
    assert sorted(by_index) == list(range(budget))  # n = budget: every trace is a choice
    for i, reference in enumerate(plain):
        assert by_index[i]["token_ids"] == reference["token_ids"], i
        assert by_index[i]["text"] == reference["text"], i
        for name in methods[1:]:  # each trace reports the other methods as the plain one
            assert not same(by_index[i]["steering"][name], reference["steering"][name]), name
    answers = [last_number(p["text"]) for p in plain]
    votes = Counter(a for a in answers if a is not None)
    deepconf = report["deepconf"]
    assert deepconf["votes"] == {a: float(c) for a, c in votes.items()}
    if votes:
        top = max(votes.values())
        assert deepconf["answer"] == next(a for a in answers if votes.get(a) == top)
        assert last_number(choices[0]["text"]) == deepconf["answer"]
    assert all(t["voted"] for t in deepconf["traces"])  # keep 1: every trace votes
    assert body["usage"]["completion_tokens"] == sum(len(p["token_ids"]) for p in plain)


def test_the_confidence_is_hfs_top_k_logprobs_of_the_same_tokens(http, hf_model):
    window, top_k = 8, 20
    body = complete(http, {"mode": "offline", "budget": 2, "keep": 1.0, "window": window,
                           "top_k": top_k, "score": "lowest_group"}, max_tokens=32)
    choice = body["choices"][0]
    tokens, prompt = choice["token_ids"], choice["prompt_token_ids"]
    logits = hf_logits(hf_model, prompt + tokens)[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    logprobs = torch.log_softmax(logits.double(), -1)
    confidences = (-logprobs.topk(top_k, -1).values.mean(-1)).tolist()  # paper eq. 2
    chosen = choice["steering"]["deepconf"]
    score = next(t["score"] for t in chosen["traces"] if t["index"] == chosen["chosen"])
    assert score == pytest.approx(min(group_confidences(confidences, window)), abs=2e-3)


def test_an_impossible_bar_cuts_every_trace_at_its_window_and_a_bar_of_zero_none(http):
    window, budget = 10, 4
    cut = complete(http, {"mode": "online", "budget": budget, "threshold": 1e9,
                          "window": window}, max_tokens=40, n=2)
    for trace in traces_of(cut):
        assert trace["tokens"] == window and trace["stopped"] and trace["stopped_at"] == 9
        assert not trace["voted"]
    assert all(c["finish_reason"] == "stop" for c in cut["choices"])
    assert cut["usage"]["completion_tokens"] == budget * window
    online = complete(http, {"mode": "online", "budget": budget, "threshold": 0.0,
                             "window": window, "consensus": None}, max_tokens=40, n=budget)
    offline = complete(http, {"mode": "offline", "budget": budget, "keep": 1.0,
                              "window": window}, max_tokens=40, n=budget)
    assert not any(t["stopped"] for t in traces_of(online))

    def tokens(body):
        return {c["steering"]["deepconf"]["chosen"]: c["token_ids"] for c in body["choices"]}
    assert tokens(online) == tokens(offline)


def test_online_warmup_sets_the_bar_and_streams_each_traces_events(http):
    options = {"mode": "online", "budget": 6, "warmup": 3, "keep": 0.5, "window": 8,
               "parallel": 2, "consensus": None}
    with http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "What is 3 + 4?"}],
            **SAMPLING, "stream": True, "stream_options": {"include_usage": True},
            "steering": {"deepconf": options}}) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    progress = [c["steering"]["deepconf"]["progress"] for c in chunks if "steering" in c]
    kinds = [p["event"] for p in progress]
    assert kinds.count("started") == 6 and kinds.index("threshold") >= 3
    assert kinds.count("finished") + kinds.count("stopped") == 6
    final = next(c for c in chunks if c["choices"])["choices"][0]
    report = final["steering"]["deepconf"]
    warm = [t for t in report["traces"] if t["phase"] == "warmup"]
    bar = float(torch.quantile(torch.tensor([t["score"] for t in warm], dtype=torch.float64),
                               0.5))
    assert report["threshold"] == pytest.approx(bar)
    bar_event = next(p for p in progress if p["event"] == "threshold")
    assert bar_event["threshold"] == pytest.approx(bar)
    for trace in report["traces"]:
        if trace["phase"] == "warmup":
            assert trace["voted"] == (trace["score"] >= bar)
        else:
            assert trace["voted"] == (not trace["stopped"])
            if not trace["stopped"]:  # an uncut trace never fell below the bar
                assert trace["score"] >= bar - 1e-4
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == report["generated_tokens"] == sum(
        t["tokens"] for t in report["traces"])


def test_other_requests_in_the_same_steps_are_unchanged(server):
    deepconf = {"prompt": PROMPT, **SAMPLING, "steering": {"deepconf": {
        "mode": "offline", "budget": 4, "keep": 0.5, "window": 8}}}
    others = [{"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.8, "seed": 3},
              {"prompt": "The capital of France", "max_tokens": 24, "temperature": 0,
               "typical_p": 0.5}]
    bodies = [{**body, "return_token_ids": True} for body in (deepconf, *others)]
    solo, together = solo_and_together(server, bodies)  # the traces shared steps with the others
    for a, b in zip(solo, together):
        assert not same(a, b)


@pytest.mark.parametrize("deepconf,extra,field", [
    ({"mode": "online"}, {"ignore_eos": True}, "ignore_eos"),
    ({"budget": 2, "warmup": 2}, {"n": 3}, "n"),
    ({"mode": "offline", "threshold": 5.0}, {}, "steering.deepconf"),
    ({"budget": 2, "warmup": 3}, {}, "steering.deepconf"),
    ({"answer": "(unclosed"}, {}, "steering.deepconf.answer"),
    ({}, {"logprobs": 2}, "logprobs"),
    ({}, {"steering": {"particles": {"n": 2}}}, "steering.deepconf"),
    ({}, {"steering": {"vreason": {}}}, "steering.deepconf"),
])
def test_what_it_cannot_honour_is_a_400_naming_the_field(http, deepconf, extra, field):
    body = complete(http, deepconf, status=400, **extra)
    assert body["error"]["param"].startswith(field), body
    for other in extra.get("steering", {}):  # the message names both
        assert f"steering.{other}" in body["error"]["message"]


def test_its_metrics_count_the_traces(http):
    with Increments(http) as added:
        body = complete(http, {"mode": "online", "budget": 3, "threshold": 1e9, "window": 6})
    labels = {"method": "deepconf"}
    assert added("steer_deepconf_traces_total", outcome="started", **labels) == 3
    assert added("steer_deepconf_traces_total", outcome="stopped", **labels) == 3
    assert added("steer_deepconf_traces_total", outcome="voted", **labels) == 0
    assert body["choices"][0]["steering"]["deepconf"]["saved_tokens"] >= 0


def test_consensus_stops_starting_traces(http):
    """With a bar that cuts nothing and one trace at a time, the first trace with an answer
    holds the whole vote: no trace starts after it."""
    body = complete(http, {"mode": "online", "budget": 6, "threshold": 0.0, "parallel": 1,
                           "consensus": 0.5, "window": 8})
    report = body["choices"][0]["steering"]["deepconf"]
    traces = report["traces"]
    answered = [t["index"] for t in traces if t["answer"] is not None]
    assert answered, traces  # the bundled model writes a number for this prompt
    assert report["consensus_reached"] and traces[-1]["index"] == answered[0]
    assert len(traces) == answered[0] + 1 < 6 and not any(t["cancelled"] for t in traces)
    assert report["answer"] == traces[-1]["answer"]
    assert report["saved_tokens"] == report["estimated_full_tokens"] - report[
        "generated_tokens"] > 0
