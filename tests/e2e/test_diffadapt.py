"""DiffAdapt on the real engine: the hidden state the probe reads (against HF transformers),
the strategy it picks and applies, composition, probe routes, the CLI, and bad input."""

import json
import math

import httpx
import pytest
import torch

from steering.methods.diffadapt.core import CLASSES, RECIPES, Recipe, difficulty_labels
from tests.conftest import ADMIN_KEY, API_KEY
from tests.prometheus import metric

MODEL = "SmolLM2-135M-Instruct"
QUESTIONS = ["What is 3 + 4? End with 'Answer: <number>'.",
             "Which is the largest of 12, 7, 30? End with 'Answer: <number>'."]
# float32 on both sides; vLLM's fused CPU kernels round differently from HF's eager ops.
RTOL, ATOL_FRACTION = 1e-4, 1e-5


def hf_final_hidden(hf_model, text: str) -> tuple[list[int], torch.Tensor]:
    """HF's last hidden state (after the final norm) at the chat prompt's last token."""
    model, tokenizer = hf_model
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(ids, add_special_tokens=False)
    with torch.no_grad():
        return ids, model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]


def pointer_probe(features: torch.Tensor) -> dict:
    """A linear probe whose logits are (x·f, 0, -x·f) / |f|²: 'easy' for a question with
    features f, with probabilities softmax(1, 0, -1); upload body weights."""
    direction = features / features.norm() ** 2
    weight = torch.stack([direction, torch.zeros_like(direction), -direction])
    return {"feature_mean": [0.0] * len(features), "feature_scale": [1.0] * len(features),
            "net.0.weight": weight.tolist(), "net.0.bias": [0.0, 0.0, 0.0]}


THRESHOLDS = {"alpha": 0.5, "beta": 1.0, "gamma": 0.5}


@pytest.fixture(scope="module")
def probes(admin_http, hf_model):
    """'points-a': easy for QUESTIONS[0]; 'always-hard': hard for everything."""
    _, features = hf_final_hidden(hf_model, QUESTIONS[0])
    hard = {"feature_mean": [0.0] * 576, "feature_scale": [1.0] * 576,
            "net.0.weight": [[0.0] * 576] * 3, "net.0.bias": [0.0, 0.0, 9.0]}
    for name, weights in (("points-a", pointer_probe(features)), ("always-hard", hard)):
        r = admin_http.post("/v1/steering/probes", json={
            "name": name, "weights": weights, "thresholds": THRESHOLDS,
            "metrics": {"held_out_accuracy": 0.0}, "description": "test"})
        assert r.status_code == 201, r.text
    yield
    for name in ("points-a", "always-hard"):
        admin_http.delete(f"/v1/steering/probes/{name}")


def chat(http, question, **body):
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": question}], "return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"]


def test_final_hidden_state_equals_hf(http, hf_model):
    for question in QUESTIONS:
        ids, expected = hf_final_hidden(hf_model, question)
        choice = chat(http, question, max_tokens=1,
                      steering={"return_hidden_states": ["final", 3]})[0]
        assert choice["prompt_token_ids"] == ids
        got = torch.tensor(choice["steering"]["hidden_states"]["final"])
        torch.testing.assert_close(got, expected, rtol=RTOL,
                                   atol=ATOL_FRACTION * float(expected.abs().max()))


def test_probe_reads_the_question_and_its_strategy_is_applied(http, hf_model, probes):
    """The reported probabilities are the probe on HF's hidden state; the generation equals a
    plain request with the Easy strategy's prompt, temperature and budget."""
    choice = chat(http, QUESTIONS[0], max_tokens=100, seed=11,
                  steering={"diffadapt": {"probe": "points-a"}})[0]
    report = choice["steering"]["diffadapt"]
    assert report["difficulty"] == "easy" and choice["steering"]["methods"] == ["diffadapt"]
    expected = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), 0).tolist()
    assert [report["probabilities"][c] for c in ("easy", "normal", "hard")] == pytest.approx(
        expected, abs=1e-3)
    strategy = report["strategy"]
    assert (strategy["temperature"], strategy["budget"], strategy["max_tokens"]) == (0.5, 0.4, 40)
    wrapped = strategy["prompt"].replace("{question}", QUESTIONS[0])
    plain = chat(http, wrapped, max_tokens=40, seed=11, temperature=0.5)[0]
    assert choice["prompt_token_ids"] == plain["prompt_token_ids"]
    assert choice["token_ids"] == plain["token_ids"]
    assert len(choice["token_ids"]) <= 40


def test_request_strategy_overrides_and_composition(http, probes):
    override = {"hard": {"prompt": "Question: {question}\nReply with the number only.",
                         "temperature": 0.0, "budget": 0.25}}
    steering = {"diffadapt": {"probe": "always-hard", "strategies": override},
                "typical": {"p": 0.9}, "east": {"vector": "explore", "scale": 2.0}}
    choice = chat(http, QUESTIONS[1], max_tokens=32, steering=steering)[0]
    report = choice["steering"]
    assert report["methods"] == ["diffadapt", "east", "typical"]
    assert report["diffadapt"]["difficulty"] == "hard"
    assert report["diffadapt"]["strategy"] == {
        "prompt": override["hard"]["prompt"], "prefill": "", "system": "", "temperature": 0.0,
        "top_p": None, "budget": 0.25, "max_tokens": 8}
    assert report["diffadapt"]["recipe"] == "variant"
    assert report["diffadapt"]["probe_position"] == {"prompt": "{question}", "prefill": ""}
    assert len(choice["token_ids"]) <= 8 and report["east"][0]["vector"] == "explore"


def test_completions_route_with_prompts_and_n(http, probes):
    r = http.post("/v1/completions", json={
        "prompt": QUESTIONS, "n": 2, "max_tokens": 20, "seed": 3,
        "steering": {"diffadapt": {"probe": "always-hard"}}})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 4
    assert {c["steering"]["diffadapt"]["strategy"]["max_tokens"] for c in choices} == {10}


def test_streaming_reports_the_decision(http, probes):
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 20,
            "stream": True, "steering": {"diffadapt": {"probe": "always-hard"}}}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    last = events[-1]["choices"][0]
    assert last["finish_reason"] is not None
    assert last["steering"]["diffadapt"]["difficulty"] == "hard"


def test_bundled_probe_serves_and_metrics_count_classes(http, server):
    def counted():
        return metric(httpx.get(f"{server.base_url}/metrics").text,
                      "steer_difficulty_class_total")

    before = counted()
    listing = http.get("/v1/steering/probes").json()["data"]
    recipes = {p["id"]: p["recipe"] for p in listing if p["id"] in ("default", "paper")}
    assert recipes == {"default": "variant", "paper": "paper"}
    for name in recipes:
        bundled = next(p for p in listing if p["id"] == name)
        assert bundled["model"] == MODEL and bundled["hidden_size"] == 576
        choice = chat(http, QUESTIONS[0], max_tokens=16,
                      steering={"diffadapt": {"probe": name}})[0]
        report = choice["steering"]["diffadapt"]
        assert report["recipe"] == recipes[name]
        assert math.isclose(sum(report["probabilities"].values()), 1.0, rel_tol=1e-5)
    assert counted() == before + 2


def test_long_question_reuses_the_probe_pass_prefill(http, server, probes):
    """The generation after the probe pass hits the prefix cache for the question's full
    KV blocks (32 tokens per block with steer serve's CPU default)."""
    def hits():
        return metric(httpx.get(f"{server.base_url}/metrics").text,
                      "vllm:prefix_cache_hits_total")

    question = "Numbers: " + ", ".join(str(i) for i in range(700, 900)) + ". Which is largest?"
    before = hits()
    chat(http, question, max_tokens=4, steering={"diffadapt": {"probe": "always-hard"}})
    assert hits() - before >= 128


@pytest.mark.parametrize("body, status, param", [
    ({"steering": {"diffadapt": {"probe": "nope"}}}, 404, "steering.diffadapt.probe"),
    ({"steering": {"diffadapt": {"probe": "always-hard", "strategies": {
        "hard": {"prompt": "no placeholder"}}}}}, 400, None),
    ({"steering": {"diffadapt": {"probe": "always-hard", "strategies": {
        "medium": {"temperature": 0.1}}}}}, 400, None),
    ({"steering": {"diffadapt": {"probe": "always-hard", "strategies": {
        "hard": {"temperature": 7}}}}}, 400, None),
    ({"steering": {"diffadapt": {"probe": "always-hard", "strategies": {
        "hard": {"budget": 0}}}}}, 400, None),
    ({"temperature": 0.3, "steering": {"diffadapt": {"probe": "always-hard"}}}, 400,
     "temperature"),
])
def test_bad_diffadapt_requests(http, probes, body, status, param):
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if param:
        assert error["param"] == param
    else:
        assert "strategies" in (error["param"] or "") + error["message"]


def test_token_prompts_and_questionless_chats_are_rejected(http, probes):
    r = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2,
                                           "steering": {"diffadapt": {"probe": "always-hard"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "be nice"}], "max_tokens": 2,
        "steering": {"diffadapt": {"probe": "always-hard"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_probe_routes_validate_and_change_nothing_on_error(http, admin_http, probes):
    before = http.get("/v1/steering/probes").json()["data"]
    one = http.get("/v1/steering/probes/points-a", params={"include_weights": True}).json()
    assert one["width"] == 0 and len(one["weights"]["net.0.weight"]) == 3
    good = {"name": "tmp-probe", "weights": one["weights"], "thresholds": THRESHOLDS}
    assert http.post("/v1/steering/probes", json=good).status_code == 403  # API key only
    assert http.delete("/v1/steering/probes/points-a").status_code == 403
    small = {k: v[:5] if k.startswith("feature") else [row[:5] for row in v]
             if k == "net.0.weight" else v for k, v in one["weights"].items()}
    ragged = {**one["weights"], "net.0.weight": [[0.0] * 576, [0.0] * 575, [0.0] * 576]}
    for bad, param in [({**good, "model": "gpt-2"}, "model"),
                       ({**good, "weights": small}, "weights"),
                       ({**good, "weights": ragged}, "weights"),
                       ({**good, "weights": {"feature_mean": [0.0]}}, "weights"),
                       ({**good, "name": "../x"}, "name"),
                       ({**good, "thresholds": {"alpha": 2, "beta": 1, "gamma": 0}},
                        "thresholds.alpha")]:
        r = admin_http.post("/v1/steering/probes", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert http.get("/v1/steering/probes").json()["data"] == before
    assert admin_http.delete("/v1/steering/probes/nothing").status_code == 404
    assert http.get("/v1/steering/probes/nothing").json()["error"]["code"] == "probe_not_found"


def test_label_and_train_with_the_cli(server, tmp_path, capsys):
    from clients.cli.probes import main as probe_main
    from clients.experiments.problems import generate
    from clients.files import write_jsonl

    problems = tmp_path / "problems.jsonl"
    write_jsonl(generate(12, seed=5), problems)
    labels = tmp_path / "labels.json"
    keys = ["--url", server.base_url, "--api-key", API_KEY, "--admin-key", ADMIN_KEY]
    probe_main([*keys, "label", "--problems", str(problems), "--samples", "2",
                "--max-tokens", "24", "--out", str(labels)])
    labelled = json.loads(labels.read_text())
    assert labelled["model"] == MODEL and len(labelled["questions"]) == 12
    row = labelled["questions"][0]
    assert len(row["features"]) == 576 and row["accuracy"] in (0.0, 0.5, 1.0)
    assert row["label"] in ("easy", "normal", "hard")
    probe_file = tmp_path / "p.safetensors"
    probe_main([*keys, "train", "--labels", str(labels), "--name", "cli-probe", "--width", "8",
                "--epochs", "5", "--test-fraction", "0.25", "--out", str(probe_file),
                "--upload"])
    assert "majority_accuracy" in capsys.readouterr().out
    probe_main([*keys, "delete", "cli-probe"])
    probe_main([*keys, "upload", str(probe_file)])  # the file keeps its name
    stored = httpx.get(f"{server.base_url}/v1/steering/probes/cli-probe",
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert stored["width"] == 8 and stored["thresholds"] == labelled["thresholds"]
    probe_main([*keys, "delete", "cli-probe"])


def test_a_probe_over_the_request_body_limit_uploads_whole(server, http, tmp_path):
    """The paper recipe's 512-wide MLP on an 896-wide model is 10 MB of JSON, over the 8 MiB
    other routes take: `steer probe upload` stores it whole (here 1,024 wide on this model's
    576 features: 13 MB) and it comes back as sent."""
    from clients.cli.probes import main as probe_main
    from steering.artifacts import write_artifact

    seeded = torch.Generator().manual_seed(0)
    tensors = {"feature_mean": torch.zeros(576), "feature_scale": torch.ones(576),
               "net.0.weight": torch.randn(1024, 576, generator=seeded),
               "net.0.bias": torch.zeros(1024),
               "net.2.weight": torch.randn(3, 1024, generator=seeded),
               "net.2.bias": torch.zeros(3)}
    probe_file = tmp_path / "wide.safetensors"
    write_artifact(probe_file, tensors, {
        "name": "wide-probe", "model": MODEL, "thresholds": THRESHOLDS, "metrics": {},
        "source": "test", "description": "test", "recipe": "paper"})
    keys = ["--url", server.base_url, "--api-key", API_KEY, "--admin-key", ADMIN_KEY]
    probe_main([*keys, "upload", str(probe_file)])
    try:
        stored = http.get("/v1/steering/probes/wide-probe",
                          params={"include_weights": True}, timeout=120).json()
        assert stored["width"] == 1024 and stored["recipe"] == "paper"
        for name, tensor in tensors.items():
            assert torch.equal(torch.tensor(stored["weights"][name]), tensor), name
    finally:
        probe_main([*keys, "delete", "wide-probe"])


# The paper's recipe (the authors' code): the bundled SmolLM2 has no <think> tokens, so its
# texts run without the tags.
PAPER = RECIPES[Recipe.PAPER]


def hf_render(hf_model, messages: list[dict]) -> list[int]:
    """HF's chat template continuing the final (assistant) message: the reference rendering."""
    _, tokenizer = hf_model
    text = tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def paper_probe_messages(question: str) -> list[dict]:
    framing = PAPER.probe_framing.for_model(False)
    return [{"role": "user", "content": framing.wrap(question)},
            {"role": "assistant", "content": framing.prefill}]


def strategy_messages(strategy, question: str) -> list[dict]:
    """A paper strategy's conversation for `question` with no system message of its own."""
    return [{"role": "system", "content": strategy.system},
            {"role": "user", "content": strategy.wrap(question)},
            {"role": "assistant", "content": strategy.prefill}]


def assert_sent_as(http, hf_model, choice: dict, messages: list[dict], **sampling) -> None:
    """The choice's prompt is HF's rendering of `messages` continuing the assistant prefill,
    and its tokens are what that conversation gets sent plainly with `sampling`."""
    assert choice["prompt_token_ids"] == hf_render(hf_model, messages)
    plain = http.post("/v1/chat/completions", json={
        "messages": messages, "continue_final_message": True, "add_generation_prompt": False,
        "return_token_ids": True, **sampling}).json()["choices"][0]
    assert choice["token_ids"] == plain["token_ids"]


@pytest.fixture(scope="module")
def paper_probes(admin_http, hf_model):
    """'paper-a': a paper-recipe probe that is Easy exactly for QUESTIONS[0] read after the
    difficulty prefill; 'paper-normal': Normal for everything."""
    model, _ = hf_model
    ids = hf_render(hf_model, paper_probe_messages(QUESTIONS[0]))
    with torch.no_grad():
        features = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    normal = {"feature_mean": [0.0] * 576, "feature_scale": [1.0] * 576,
              "net.0.weight": [[0.0] * 576] * 3, "net.0.bias": [0.0, 9.0, 0.0]}
    for name, weights in (("paper-a", pointer_probe(features)), ("paper-normal", normal)):
        r = admin_http.post("/v1/steering/probes", json={
            "name": name, "weights": weights, "thresholds": vars(PAPER.thresholds),
            "recipe": "paper", "description": "test"})
        assert r.status_code == 201 and r.json()["recipe"] == "paper", r.text
    yield ids
    for name in ("paper-a", "paper-normal"):
        admin_http.delete(f"/v1/steering/probes/{name}")


def test_paper_probe_reads_after_the_difficulty_prefill_and_prefills_its_strategy(
        http, hf_model, paper_probes):
    """The probe's probabilities are its formula on HF's hidden state at the last token of the
    difficulty prefill (rendered by HF's chat template); the answer continues the Easy
    strategy's prefill after the paper's system prompt, with its temperature, top-p and budget,
    token for token as the same conversation sent plainly."""
    choice = chat(http, QUESTIONS[0], max_tokens=100, seed=5,
                  steering={"diffadapt": {"probe": "paper-a", "continuation": False}})[0]
    report = choice["steering"]["diffadapt"]
    expected = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), 0).tolist()
    assert [report["probabilities"][c] for c in CLASSES] == pytest.approx(expected, abs=1e-3)
    framing = PAPER.probe_framing.for_model(False)
    assert report["recipe"] == "paper" and report["difficulty"] == "easy"
    assert report["probe_position"] == {"prompt": framing.prompt, "prefill": framing.prefill}
    easy = PAPER.strategies["easy"].for_model(False)
    assert report["strategy"] == {"prompt": easy.prompt, "prefill": easy.prefill,
                                  "system": easy.system, "temperature": 0.5, "top_p": 1.0,
                                  "budget": 0.4, "max_tokens": 40}
    assert report["continuation"] is None and report["continued"] is None
    assert_sent_as(http, hf_model, choice, strategy_messages(easy, QUESTIONS[0]), max_tokens=40,
                   seed=5, temperature=0.5, top_p=1.0)


def test_paper_normal_strategy_samples_with_top_p(http, hf_model, paper_probes):
    """Normal: T 0.8 and top-p 0.95; a system message the client sent is kept."""
    system = {"role": "system", "content": "Be brief."}
    r = http.post("/v1/chat/completions", json={
        "messages": [system, {"role": "user", "content": QUESTIONS[1]}], "max_tokens": 30,
        "seed": 8, "return_token_ids": True,
        "steering": {"diffadapt": {"probe": "paper-normal", "continuation": False}}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    normal = PAPER.strategies["normal"].for_model(False)
    messages = [system, {"role": "user", "content": normal.wrap(QUESTIONS[1])},
                {"role": "assistant", "content": normal.prefill}]
    assert_sent_as(http, hf_model, choice, messages, max_tokens=30, seed=8, temperature=0.8,
                   top_p=0.95)
    assert choice["steering"]["diffadapt"]["strategy"]["top_p"] == 0.95


def test_a_set_difficulty_serves_its_strategy_without_the_probe_pass(http, hf_model,
                                                                     paper_probes):
    """`difficulty` (a fixed-strategy baseline): the class's strategy, sent as the same
    conversation plainly would be, with one engine request (no probe pass) and no
    probabilities in the report."""
    def engine_requests() -> float:
        return metric(http.get("/metrics").text, "vllm:request_success_total")

    before = engine_requests()
    choice = chat(http, QUESTIONS[0], max_tokens=20, seed=4, steering={"diffadapt": {
        "probe": "paper-a", "difficulty": "hard", "continuation": False}})[0]
    assert engine_requests() == before + 1
    report = choice["steering"]["diffadapt"]
    assert report["difficulty"] == "hard" and report["probabilities"] is None \
        and report["probe_position"] is None
    hard = PAPER.strategies["hard"].for_model(False)
    assert_sent_as(http, hf_model, choice, strategy_messages(hard, QUESTIONS[0]), max_tokens=10,
                   seed=4, temperature=0.4, top_p=1.0)


def test_paper_recipe_continues_an_answer_its_budget_cut_off(http, hf_model, paper_probes):
    """The authors' continuation: an answer its budget cut off goes on after their forced
    prefix, sampled at T 0.6, top-p 1.0 up to '}' and unsteered: token for token what the
    engine gives the whole context (the prompt, the cut-off answer, the prefix's tokens) sent as
    a completion prompt with those settings. The prefix's tokens have no entropy; usage
    counts every token; streamed, the same text and one entropy value per token."""
    question, budget, seed = QUESTIONS[1], 12, 3
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": budget,
            "seed": seed, "steering": {"diffadapt": {"probe": "paper-normal"},
                                       "return_entropy": True}}
    r = http.post("/v1/chat/completions", json={**body, "return_token_ids": True})
    assert r.status_code == 200, r.text
    answer = r.json()
    choice = answer["choices"][0]
    continuation = PAPER.continuation
    report = choice["steering"]["diffadapt"]
    assert report["continuation"] == {"prefix": "\nNow the correct answer is \\boxed{",
                                      "temperature": 0.6, "top_p": 1.0, "max_tokens": 1024,
                                      "stop": "}"}
    _, tokenizer = hf_model
    prefix_ids = tokenizer.encode(continuation.prefix, add_special_tokens=False)
    ids = choice["token_ids"]
    cut_off, forced, sampled = ids[:budget], ids[budget:budget + len(prefix_ids)], \
        ids[budget + len(prefix_ids):]
    plain = http.post("/v1/chat/completions", json={
        **body, "steering": {"diffadapt": {"probe": "paper-normal", "continuation": False}},
        "return_token_ids": True}).json()["choices"][0]
    assert plain["finish_reason"] == "length" and plain["token_ids"] == cut_off
    assert forced == prefix_ids and sampled
    reference = http.post("/v1/completions", json={
        "prompt": choice["prompt_token_ids"] + cut_off + prefix_ids, "max_tokens": 1024,
        "temperature": 0.6, "top_p": 1.0, "seed": seed, "stop": ["}"],
        "include_stop_str_in_output": True, "return_token_ids": True}).json()["choices"][0]
    assert sampled == reference["token_ids"]
    assert choice["message"]["content"] == \
        plain["message"]["content"] + continuation.prefix + reference["text"]
    assert choice["finish_reason"] == reference["finish_reason"]
    assert report["continued"] == {"prefix_tokens": len(prefix_ids), "tokens": len(sampled),
                                   "finish_reason": reference["finish_reason"]}
    assert answer["usage"]["completion_tokens"] == len(ids)
    entropy = choice["steering"]["token_entropy"]
    assert len(entropy) == len(ids)
    assert [h is None for h in entropy] == [False] * budget + [True] * len(prefix_ids) + \
        [False] * len(sampled)
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        chunks = [json.loads(line[6:]) for line in streamed.iter_lines()
                  if line.startswith("data: {")]
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == \
        choice["message"]["content"]
    assert sum(len(d.get("steering", {}).get("chunk_entropy", [])) for d in deltas) == len(ids)
    assert deltas[-1]["finish_reason"] == choice["finish_reason"]
    assert deltas[-1]["steering"]["diffadapt"]["continued"] == report["continued"]


def test_bad_paper_recipe_requests(http, probes, paper_probes):
    paper = {"diffadapt": {"probe": "paper-normal"}}
    r = http.post("/v1/completions", json={"prompt": "What is 2 + 2?", "max_tokens": 2,
                                           "steering": paper})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.diffadapt.probe"
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "top_p": 0.5, "max_tokens": 2,
        "steering": paper})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "So"}],
        "max_tokens": 2, "steering": paper})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = http.post("/v1/chat/completions", json={  # a variant probe with a prefill: the same
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "So"}],
        "max_tokens": 2, "steering": {"diffadapt": {"probe": "always-hard", "strategies": {
            "hard": {"prefill": "Well,"}}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert chat(http, "hi", max_tokens=2, steering=paper)  # and the server still serves


def test_label_and_train_the_paper_recipe_with_the_cli(http, server, tmp_path, capsys):
    """Features at the paper's position, the authors' top-10 entropy from the sampled answers'
    log-probs, their thresholds and rule; training keeps the best validation macro-F1."""
    from clients.cli.probes import main as probe_main
    from clients.experiments.problems import generate
    from clients.files import write_jsonl

    problems = tmp_path / "problems.jsonl"
    write_jsonl(generate(10, seed=6), problems)
    labels = tmp_path / "labels.json"
    keys = ["--url", server.base_url, "--api-key", API_KEY, "--admin-key", ADMIN_KEY]
    probe_main([*keys, "label", "--recipe", "paper", "--problems", str(problems),
                "--samples", "2", "--max-tokens", "16", "--out", str(labels)])
    labelled = json.loads(labels.read_text())
    assert (labelled["recipe"], labelled["top_logprobs"], labelled["temperature"]) == (
        "paper", 10, 0.6)
    assert labelled["thresholds"] == vars(PAPER.thresholds)
    rows = labelled["questions"]
    want = difficulty_labels(torch.tensor([r["accuracy"] for r in rows]),
                             torch.tensor([r["entropy"] for r in rows]), PAPER.thresholds,
                             Recipe.PAPER)
    assert [r["label"] for r in rows] == [CLASSES[i] for i in want.tolist()]
    assert all(0 <= r["entropy"] <= math.log(11) for r in rows)
    first = rows[0]
    served = chat(http, None, max_tokens=1, temperature=0.0,
                  messages=paper_probe_messages(first["question"]), continue_final_message=True,
                  add_generation_prompt=False, steering={"return_hidden_states": ["final"]})[0]
    assert first["features"] == served["steering"]["hidden_states"]["final"]
    probe_main([*keys, "train", "--labels", str(labels), "--name", "cli-paper", "--width", "8",
                "--epochs", "5", "--test-fraction", "0.2", "--upload"])
    assert "validation_macro_f1" in capsys.readouterr().out
    stored = httpx.get(f"{server.base_url}/v1/steering/probes/cli-paper",
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert stored["recipe"] == "paper" and stored["width"] == 8
    probe_main([*keys, "delete", "cli-paper"])


def test_in_an_orchestration_every_trace_takes_the_strategy(http, probes):
    """DeepConf's traces are each the plain request with the strategy's prompt, temperature
    and budget (and the trace's seed); without `continuation: false` it is a 400."""
    override = {"hard": {"prompt": "Question: {question}\nReply with the number only.",
                         "temperature": 0.7, "budget": 0.25}}
    diffadapt = {"probe": "always-hard", "strategies": override, "continuation": False}
    sampling = {"max_tokens": 32, "seed": 7, "top_p": 1.0, "top_k": -1}
    choices = chat(http, QUESTIONS[1], n=3, **sampling, steering={
        "diffadapt": diffadapt, "deepconf": {"mode": "offline", "budget": 3, "keep": 1.0}})
    report = choices[0]["steering"]
    assert report["methods"] == ["deepconf", "diffadapt"]
    assert report["diffadapt"]["difficulty"] == "hard"
    assert report["diffadapt"]["strategy"]["max_tokens"] == 8
    wrapped = override["hard"]["prompt"].replace("{question}", QUESTIONS[1])
    for choice in choices:
        trace = choice["steering"]["deepconf"]["chosen"]
        plain = chat(http, wrapped, **{**sampling, "max_tokens": 8, "seed": 7 + trace},
                     temperature=0.7)[0]
        assert choice["prompt_token_ids"] == plain["prompt_token_ids"]
        assert choice["token_ids"] == plain["token_ids"], trace
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 8,
        "steering": {"diffadapt": {"probe": "always-hard"}, "deepconf": {"budget": 4}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.diffadapt.continuation"
