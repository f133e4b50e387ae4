"""(Entropic) particle filtering on the real engine: reports, rewards, streaming, limits,
prefix-cache reuse, cancellation."""

import json
import math
import time

import httpx
import pytest

from tests.conftest import REWARD_TIMEOUT_S
from tests.prometheus import metric

QUESTION = "What is 12 + 7? Think in short steps separated by blank lines. End with 'Answer: <n>'."
PARTICLES = {"n": 4, "max_steps": 3, "return_particles": True}


def chat(http, particles, question=QUESTION, **body):
    return http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": question}], "max_tokens": 48,
        "steering": {"particles": particles, **body.pop("steering", {})}, **body})


def test_report_and_chosen_particle(http):
    r = chat(http, {**PARTICLES, "annealing": "ess"}, seed=5)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    report = choice["steering"]["particles"]
    assert len(body["choices"]) == 1 and choice["steering"]["methods"] == ["particles"]
    assert 1 <= len(report["steps"]) <= 3
    assert report["resamples"] == sum(s["resampled"] for s in report["steps"])
    for step in report["steps"]:
        assert 1 <= step["ess"] <= 4 + 1e-9 and step["temperature"] >= 1
        assert 1 <= step["distinct_ancestors"] <= 4
        assert step["ess"] == pytest.approx(1 / sum(w * w for w in step["weights"]))
        assert len(step["ancestors"]) == (4 if step["resampled"] else 0)
    particles = report["particles"]
    assert len(particles) == 4 == len(report["final_scores"])
    chosen = particles[report["chosen"]]
    assert choice["message"]["content"] == chosen["text"]
    assert chosen["log_weight"] == max(p["log_weight"] for p in particles)
    for p in particles:  # self-certainty: exp(-mean entropy of the last step), in (0, 1]
        assert 0 < p["score"] <= 1
        assert p["log_weight"] == pytest.approx(
            math.log(min(max(p["score"], 1e-7), 1 - 1e-7) / (1 - min(max(p["score"], 1e-7),
                                                                      1 - 1e-7))), rel=1e-6)
    assert body["usage"]["completion_tokens"] == report["generated_tokens"]
    assert report["generated_tokens"] >= sum(1 for _ in particles)


def test_seeded_requests_repeat(http):
    a = chat(http, PARTICLES, seed=21).json()["choices"][0]
    b = chat(http, PARTICLES, seed=21).json()["choices"][0]
    assert a["message"]["content"] == b["message"]["content"]
    assert a["steering"]["particles"]["final_scores"] == b["steering"]["particles"][
        "final_scores"]


def scored_run(http, reward_scorer, mode: str, seed: int | None,
               **options) -> tuple[dict, int]:
    """A run whose rewards come from the loopback scorer in `mode`, one word per step (so every
    run has its steps): its report and the number of scoring calls it made."""
    scorer, _ = reward_scorer
    scorer.mode, before = mode, scorer.calls
    try:
        r = chat(http, {**PARTICLES, "reward": "http", "step_delimiter": " ", **options},
                 seed=seed)
    finally:
        scorer.mode = "ok"
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["steering"]["particles"], scorer.calls - before


def resampled(report: dict) -> list[dict]:
    return [s for s in report["steps"] if s["resampled"]]


def test_particles_step_ahead_of_resampling_unless_seeded(http, server, reward_scorer):
    """A particle that ends its step starts its next one at once, and its first copy after
    resampling takes it. With flat rewards, systematic resampling keeps every particle once,
    so every step after the first iteration is one started ahead and none is discarded; a
    seeded request starts none (its steps' seeds follow the order of the engine calls)."""
    def steps_ahead() -> dict[str, float]:
        page = httpx.get(f"{server.base_url}/metrics").text
        return {outcome: metric(page, "steer_particle_steps_ahead_total", outcome=outcome)
                for outcome in ("taken", "discarded")}

    before = steps_ahead()
    report, _ = scored_run(http, reward_scorer, "flat", None, max_steps=4)
    after = steps_ahead()
    assert all(s["ancestors"] in ([0, 1, 2, 3], []) for s in report["steps"])
    later = sum(s["live"] for s in report["steps"][1:])
    assert later > 0  # one word per step: some particle always goes on
    assert after == {"taken": before["taken"] + later, "discarded": before["discarded"]}
    scored_run(http, reward_scorer, "flat", 7, max_steps=4)
    assert steps_ahead() == after


@pytest.mark.parametrize("annealing", ["ess", "entropy", "base", "none"])
def test_annealing_temperature_follows_its_rule(http, reward_scorer, annealing):
    """Far-apart rewards (low ESS), annealing on for every step (`ess_threshold` and
    `early_phase` 1): each step's temperature is its rule's, from the step's own ESS."""
    report, _ = scored_run(http, reward_scorer, "spread", 4, annealing=annealing,
                           ess_threshold=1.0, early_phase=1.0)
    steps = resampled(report)
    assert steps
    for s in steps:
        ratio, progress = s["ess"] / PARTICLES["n"], s["step"] / PARTICLES["max_steps"]
        assert ratio < 1
        if annealing == "entropy":  # β = H_n + (1 - H_n)·progress ≥ progress
            assert 1 <= s["temperature"] <= 1 / progress + 1e-9
            continue
        expected = {"ess": max(1.0, (1 / ratio) * (1 - progress)),
                    "base": max(1.0, 2 - progress), "none": 1.0}[annealing]
        assert s["temperature"] == pytest.approx(expected)
    if annealing in ("ess", "base"):
        assert any(s["temperature"] > 1 for s in steps)


@pytest.mark.parametrize("option", [{"ess_threshold": 1e-9}, {"early_phase": 0.0}])
def test_annealing_off_below_threshold_or_after_early_phase(http, reward_scorer, option):
    report, _ = scored_run(http, reward_scorer, "spread", 4, annealing="ess",
                           **{"ess_threshold": 1.0, "early_phase": 1.0, **option})
    assert resampled(report) and all(s["temperature"] == 1 for s in report["steps"])


@pytest.mark.parametrize("lookahead", [False, True])
def test_lookahead_scores_each_resampling_step_twice(http, reward_scorer, lookahead):
    report, calls = scored_run(http, reward_scorer, "spread", 6, lookahead=lookahead)
    assert report["lookahead"] is lookahead
    assert calls == len(report["steps"]) + (len(resampled(report)) if lookahead else 0)


def test_resampling_schemes_on_equal_weights(http, reward_scorer):
    """Equal rewards: systematic resampling keeps every particle once, multinomial draws
    repeat some (all 4 distinct with probability 4!/4⁴ ≈ 0.09 per step)."""
    distinct = {}
    for scheme in ("systematic", "multinomial"):
        distinct[scheme] = [s["distinct_ancestors"] for seed in (1, 2, 3)
                            for s in resampled(scored_run(http, reward_scorer, "flat", seed,
                                                          resampling=scheme)[0])]
    assert distinct["systematic"] and set(distinct["systematic"]) == {4}
    assert len(distinct["multinomial"]) >= 3 and min(distinct["multinomial"]) < 4


def test_select_sample_can_choose_a_lower_weight_particle(http, reward_scorer):
    """Near-equal rewards: a draw from softmax(w) picks a particle below the best for some
    seed (argmax never does: test_report_and_chosen_particle)."""
    chosen_below_max = []
    for seed in range(1, 7):
        report, _ = scored_run(http, reward_scorer, "mild", seed, select="sample")
        weights = [p["log_weight"] for p in report["particles"]]
        chosen_below_max.append(weights[report["chosen"]] < max(weights))
    assert any(chosen_below_max)


def test_stop_strings_finish_particles(http):
    r = chat(http, {**PARTICLES, "annealing": "none", "stop": ["Answer:"]}, seed=3)
    assert r.status_code == 200, r.text
    for p in r.json()["choices"][0]["steering"]["particles"]["particles"]:
        assert p["finished"]
        assert "Answer:" in p["text"] or p["steps"] == 3 or not p["text"].endswith("\n\n")


def test_composes_with_typical_and_east(http):
    r = chat(http, PARTICLES, typical_p=0.9,
             steering={"east": {"vector": "explore", "scale": 2.0}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["steering"]["methods"] == ["east", "particles", "typical"]


def test_http_reward(http, reward_scorer):
    scorer, _ = reward_scorer
    scorer.mode, before = "ok", scorer.calls
    r = chat(http, {**PARTICLES, "reward": "http"})
    assert r.status_code == 200, r.text
    report = r.json()["choices"][0]["steering"]["particles"]
    assert scorer.calls - before == len(report["steps"])
    for p in report["particles"]:  # the scorer's formula on the trajectory
        digits = sum(c.isdigit() for c in p["text"]) / max(1, len(p["text"]))
        assert p["score"] == pytest.approx(digits)


def test_prm_reward_equals_hf_classifier(http, prm_path):
    """Scores from the --prm engine are the classifier's sigmoid at the trajectory's last token,
    as HF transformers computes it."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    r = chat(http, {"n": 3, "max_steps": 1, "reward": "prm", "return_particles": True},
             return_token_ids=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    tokenizer = AutoTokenizer.from_pretrained(prm_path)
    model = LlamaForSequenceClassification.from_pretrained(prm_path, dtype=torch.float32)
    prompt = tokenizer.decode(choice["prompt_token_ids"])
    for p in choice["steering"]["particles"]["particles"]:
        ids = tokenizer.encode(prompt + p["text"])
        with torch.no_grad():
            expected = torch.sigmoid(model(torch.tensor([ids])).logits[0, -1]).item()
        assert p["score"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("mode", ["slow", "broken"])
def test_failing_reward_scorer_is_a_clear_error_in_time(http, reward_scorer, mode):
    scorer, _ = reward_scorer
    scorer.mode = mode
    try:
        started = time.monotonic()
        r = chat(http, {**PARTICLES, "reward": "http"})
        elapsed = time.monotonic() - started
    finally:
        scorer.mode = "ok"
    assert r.status_code == 502, r.text
    assert "reward scorer" in r.json()["error"]["message"]
    assert elapsed < REWARD_TIMEOUT_S * 2 + 30  # two attempts, plus one step's generation


def test_streaming_progress_then_answer(http):
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 48,
            "stream": True, "steering": {"particles": PARTICLES}}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    progress = [e for e in events if not e["choices"]]
    answer = [e for e in events if e["choices"]]
    assert progress and all("progress" in e["steering"]["particles"] for e in progress)
    assert [e["steering"]["particles"]["progress"]["step"] for e in progress] == list(
        range(1, len(progress) + 1))
    final = answer[-1]["choices"][0]
    assert final["finish_reason"] is not None
    report = final["steering"]["particles"]
    assert len(report["steps"]) == len(progress)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in answer)
    assert text == report["particles"][report["chosen"]]["text"]


def test_particles_reuse_the_prompt_through_the_prefix_cache(http, server):
    def hits():
        return metric(httpx.get(f"{server.base_url}/metrics").text,
                          "vllm:prefix_cache_hits_total")

    long = "Numbers: " + ", ".join(str(i) for i in range(300, 500)) + ". " + QUESTION
    before = hits()
    r = chat(http, {"n": 4, "max_steps": 2}, question=long)
    assert r.status_code == 200, r.text
    # every particle's step after the first prompt prefill reads the prompt's full blocks
    assert hits() - before >= 3 * 128


def test_metrics(http, server):
    before = httpx.get(f"{server.base_url}/metrics").text
    chat(http, PARTICLES)
    after = httpx.get(f"{server.base_url}/metrics").text
    for name in ("steer_particle_ess_ratio_count", "steer_particle_temperature_count",
                 "steer_particle_steps_count"):
        assert metric(after, name) > metric(before, name), name


@pytest.mark.parametrize("body, param", [
    ({"steering": {"particles": {"n": 64}}, "max_tokens": 2000}, "steering.particles.n"),
    ({"steering": {"particles": {"n": 0}}}, "steering.particles.n"),
    ({"steering": {"particles": {"annealing": "cosine"}}}, "steering.particles.annealing"),
    ({"steering": {"particles": {"step_delimiter": ""}}}, "steering.particles.step_delimiter"),
    ({"steering": {"particles": {"n": 2}}, "n": 2}, "n"),
    ({"steering": {"particles": {"n": 2}}, "stop": ["x"]}, "stop"),
    ({"steering": {"particles": {"n": 2}}, "logprobs": True}, "logprobs"),
    ({"steering": {"particles": {"n": 2}, "diffadapt": {"probe": "default"}}},
     "steering.diffadapt.continuation"),  # its continuation would not run in the steps
    ({"steering": {"particles": {"n": 2}, "return_hidden_states": [1]}}, "steering.particles"),
])
def test_bad_particle_requests(http, body, param):
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **body}
    r = http.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_completions_route(http):
    r = http.post("/v1/completions", json={"prompt": "Q: 2 + 2 = ?\nA:", "max_tokens": 16,
                                           "steering": {"particles": {"n": 2, "max_steps": 2}}})
    assert r.status_code == 200, r.text
    assert "particles" in r.json()["choices"][0]["steering"]


def test_disconnect_stops_all_particles(http, server):
    def running() -> float:
        return metric(http.get("/metrics").text, "vllm:num_requests_running")

    def state() -> str:
        """What the server held, when the particles are not all running."""
        page = http.get("/metrics").text
        return (f"running {metric(page, 'vllm:num_requests_running')}, waiting "
                f"{metric(page, 'vllm:num_requests_waiting')}, held "
                f"{metric(page, 'steer_held_sequences')}\n"
                + server.log_tail(60, without='"GET /metrics'))

    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", headers=http.headers,
                      timeout=60, json={
                          "messages": [{"role": "user", "content": "Tell a long story."}],
                          "max_tokens": 1500, "ignore_eos": True, "stream": True,
                          "steering": {"particles": {"n": 8, "max_steps": 4,
                                                     "step_delimiter": "@@@@"}}}) as r:
        assert r.status_code == 200
        deadline = time.monotonic() + 60
        while running() < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running() >= 8, state()  # all particles of the step are in the engine together
    deadline = time.monotonic() + 30
    while running() > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running() == 0
