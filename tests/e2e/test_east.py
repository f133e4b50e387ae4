"""EAST inside the real engine, in vLLM's default compiled mode, against an HF reference."""

import asyncio
import json

import httpx
import pytest
import torch

from tests.conftest import ADMIN_KEY, API_KEY

MODEL = "SmolLM2-135M-Instruct"
LAYER = 12
PROMPTS = ["The best thing about mornings is", "My plan for the weekend:",
           "Q: What is the capital of Spain?\nA:"]


def direction(hf_model, seed: int) -> torch.Tensor:
    """A unit direction scaled to the typical norm of the layer's activations."""
    model, tokenizer = hf_model
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(model.config.hidden_size, generator=g)
    with torch.no_grad():
        hidden = model(torch.tensor([tokenizer.encode(PROMPTS[0])]),
                       output_hidden_states=True).hidden_states[LAYER + 1][0]
    return u / u.norm() * hidden.norm(dim=-1).mean()


@pytest.fixture(scope="module")
def vectors(admin_http, hf_model):
    made = {}
    for name, seed in (("dir-a", 1), ("dir-b", 2)):
        u = direction(hf_model, seed)
        r = admin_http.post("/v1/steering/vectors", json={
            "name": name, "values": u.tolist(), "layer": LAYER, "method": "test",
            "description": "random direction"})
        assert r.status_code == 201, r.text
        made[name] = u
    yield made
    for name in made:
        admin_http.delete(f"/v1/steering/vectors/{name}")


def hf_steered_greedy(hf_model, prompt_ids, steps, uses, all_positions=False):
    """HF generate with forward hooks adding scale * u at the layer output, on the positions
    that predict generated tokens (or all)."""
    model, _ = hf_model
    hooks = []
    for u, scale, layer in uses:
        def hook(module, args, output, u=u, scale=scale):
            hidden = output[0] if isinstance(output, tuple) else output
            start = 0 if (all_positions or hidden.shape[1] == 1) else len(prompt_ids) - 1
            hidden = hidden.clone()
            hidden[:, start:] += scale * u
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        hooks.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=steps,
                                 do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    return out[0, len(prompt_ids):].tolist()


def complete(openai_client, prompt, steering=None, max_tokens=16):
    body = {"return_token_ids": True}
    if steering:
        body["steering"] = steering
    reply = openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, extra_body=body)
    return reply.choices[0].model_extra


@pytest.mark.parametrize("positions", ["generated", "all"])
def test_vllm_steering_equals_hf_hook_reference(openai_client, hf_model, vectors, positions):
    changed = 0
    for prompt in PROMPTS:
        plain = complete(openai_client, prompt)
        steered = complete(openai_client, prompt, {"east": {
            "vector": "dir-a", "scale": 4.0, "positions": positions}})
        reference = hf_steered_greedy(hf_model, steered["prompt_token_ids"], 16,
                                      [(vectors["dir-a"], 4.0, LAYER)],
                                      all_positions=positions == "all")
        assert steered["token_ids"] == reference, prompt
        assert steered["steering"]["methods"] == ["east"]
        assert steered["steering"]["east"] == [{"vector": "dir-a", "scale": 4.0,
                                                "layers": [LAYER], "positions": positions}]
        changed += steered["token_ids"] != plain["token_ids"]
    assert changed >= 2, "steering should change most greedy outputs (else the test is void)"


def test_two_vectors_and_other_layers_add_up(openai_client, hf_model, vectors):
    prompt = PROMPTS[1]
    steered = complete(openai_client, prompt, {"east": [
        {"vector": "dir-a", "scale": 2.0},
        {"vector": "dir-b", "scale": -3.0, "layers": [6, 20]}]})
    reference = hf_steered_greedy(hf_model, steered["prompt_token_ids"], 16, [
        (vectors["dir-a"], 2.0, LAYER), (vectors["dir-b"], -3.0, 6),
        (vectors["dir-b"], -3.0, 20)])
    assert steered["token_ids"] == reference


def test_mixed_batch_isolation(async_openai, openai_client, vectors):
    """Unsteered requests give their solo tokens; two steered requests with different
    vectors each give their own solo tokens, all in one continuous batch."""
    east_a = {"east": {"vector": "dir-a", "scale": 4.0}}
    east_b = {"east": {"vector": "dir-b", "scale": 4.0, "positions": "all"}}
    cases = [(p, s) for p in PROMPTS for s in (None, east_a, east_b)]
    solo = [complete(openai_client, p, s, max_tokens=24)["token_ids"] for p, s in cases]

    async def together():
        client = async_openai()
        async with client:
            replies = await asyncio.gather(*(client.completions.create(
                model=MODEL, prompt=p, max_tokens=24, temperature=0,
                extra_body={"return_token_ids": True, **({"steering": s} if s else {})})
                for p, s in cases))
        return [r.choices[0].model_extra["token_ids"] for r in replies]

    assert asyncio.run(together()) == solo
    assert len({tuple(t) for t in solo[:3]}) == 3  # the three variants differ


def test_east_composes_with_typical(openai_client, vectors):
    reply = openai_client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0.8, seed=1,
        extra_body={"typical_p": 0.7, "steering": {"east": {"vector": "dir-a", "scale": 2.0}}})
    assert reply.choices[0].model_extra["steering"]["methods"] == ["east", "typical"]


@pytest.mark.parametrize("east,status,param", [
    ({"vector": "nope"}, 404, "steering.east.vector"),
    ([{"vector": "dir-a"}, {"vector": "nope"}], 404, "steering.east.1.vector"),
    ({"vector": "dir-a", "layers": [99]}, 400, "steering.east.layers"),
    ({"vector": "dir-a", "scale": 1e9}, 400, "steering.east.scale"),
    ({"vector": "dir-a", "positions": "some"}, 400, "steering.east.positions"),
    ({"scale": 1.0}, 400, "steering.east.vector"),
])
def test_bad_east_requests(http, vectors, east, status, param):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                           "steering": {"east": east}})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_vector_routes_and_admin_key(server, http, admin_http, vectors):
    listing = http.get("/v1/steering/vectors").json()["data"]
    assert {"dir-a", "dir-b", "explore"} <= {v["id"] for v in listing}  # explore: bundled
    assert next(v for v in listing if v["id"] == "explore")["method"] == "east"
    artifacts = str(server.log_path.parent / "artifacts")
    assert artifacts not in http.get("/v1/steering/vectors").text  # no file-system paths
    assert not any("path" in v or "file" in v for v in listing)
    one = http.get("/v1/steering/vectors/dir-a", params={"include_values": True}).json()
    assert one["layer"] == LAYER and len(one["values"]) == 576
    upload = {"name": "tmp", "values": [0.0] * 576, "layer": 0}
    assert http.post("/v1/steering/vectors", json=upload).status_code == 403  # API key only
    assert http.delete("/v1/steering/vectors/dir-a").status_code == 403
    for bad, param in [({**upload, "name": "../x"}, "name"),
                       ({**upload, "values": [0.0] * 5}, "values"),
                       ({**upload, "values": [0.0] * 575 + ["NaN"]}, "values.575"),
                       ({**upload, "layer": 30}, "layer"),
                       ({**upload, "model": "gpt-2"}, "model")]:
        r = admin_http.post("/v1/steering/vectors", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert admin_http.get("/v1/steering/vectors/tmp").status_code == 404
    assert admin_http.delete("/v1/steering/vectors/nothing").status_code == 404
    assert http.get("/v1/steering/vectors/..%2Fetc").status_code in (400, 404)
    big = admin_http.post("/v1/steering/vectors", content=b"x" * (9 << 20),
                          headers={"content-type": "application/json"})
    assert big.status_code == 413


@pytest.mark.parametrize("steer", [False, True])
def test_hidden_states_equal_hf(openai_client, hf_model, vectors, steer):
    """The residual stream captured inside the compiled engine at the last prompt token equals
    HF's hidden_states[layer + 1] (with the same steering added, when steered)."""
    model, _ = hf_model
    layers = [0, LAYER, 29]
    steering = {"return_hidden_states": layers}
    if steer:
        steering["east"] = {"vector": "dir-a", "scale": 4.0, "layers": [3]}
    reply = complete(openai_client, PROMPTS[2], steering, max_tokens=2)
    captured = reply["steering"]["hidden_states"]
    assert sorted(captured) == sorted(str(layer) for layer in layers)
    hook = None
    if steer:
        def add(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, -1] += 4.0 * vectors["dir-a"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        hook = model.model.layers[3].register_forward_hook(add)
    try:
        with torch.no_grad():
            states = model(torch.tensor([reply["prompt_token_ids"]]),
                           output_hidden_states=True).hidden_states
    finally:
        if hook:
            hook.remove()
    for layer in layers[:2]:  # HF's last entry is after the final norm; compare the stream
        expected = states[layer + 1][0, -1]
        got = torch.tensor(captured[str(layer)])
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max()), layer


def test_compute_contrastive_vector_with_the_cli(server, hf_model, tmp_path):
    """`steer vectors compute contrastive` stores the difference of the mean last-token
    activations, equal to HF's."""
    from clients.cli.vectors import main as vectors_main

    model, tokenizer = hf_model
    pos, neg = ["I love this, it is wonderful", "What a great day"], ["I hate this", "Awful."]
    for name, prompts in (("pos.jsonl", pos), ("neg.jsonl", neg)):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    vectors_main(["--url", server.base_url, "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
                  "compute", "contrastive", "--prompts", str(tmp_path / "pos.jsonl"),
                  "--negative", str(tmp_path / "neg.jsonl"), "--layer", "10",
                  "--name", "sentiment"])
    stored = httpx.get(f"{server.base_url}/v1/steering/vectors/sentiment",
                       params={"include_values": True},
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert stored["layer"] == 10 and stored["method"] == "contrastive"

    def mean_activation(prompts):
        with torch.no_grad():
            return torch.stack([model(torch.tensor([tokenizer.encode(p)]),
                                      output_hidden_states=True).hidden_states[11][0, -1]
                                for p in prompts]).mean(0)
    expected = mean_activation(pos) - mean_activation(neg)
    got = torch.tensor(stored["values"])
    assert torch.allclose(got, expected, atol=2e-3 * expected.abs().max())


def test_compute_east_vector_with_the_cli(server, tmp_path):
    from clients.cli.vectors import main as vectors_main
    from clients.experiments.bandit import ACTION_PATTERN, make_prompts

    path = tmp_path / "bandit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_prompts(6, seed=3)))
    vectors_main(["--url", server.base_url, "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
                  "compute", "east", "--prompts", str(path), "--layer", "15", "--name",
                  "explore-test", "--samples", "6", "--action-pattern", ACTION_PATTERN])
    stored = httpx.get(f"{server.base_url}/v1/steering/vectors/explore-test",
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert stored["method"] == "east" and stored["norm"] > 0
    assert '"prompts_used"' in stored["source"]


def test_compute_east_from_logged_runs_with_the_cli(server, tmp_path):
    """The paper's recipe: agents' runs logged against the server (each step's prompt is the
    previous one's plus the pull it made), then a vector centred per run and kept raw."""
    from clients.cli.vectors import main as vectors_main
    from clients.experiments.bandit import ACTION_PATTERN, log_runs

    headers = {"Authorization": f"Bearer {API_KEY}"}
    records = asyncio.run(log_runs(server.base_url, headers, runs=2, steps=3, arms=2, seed=5))
    assert [(r["run"], r["step"]) for r in records] == [(k, t) for k in (0, 1) for t in range(3)]
    for before, after in zip(records, records[1:]):
        if after["run"] == before["run"]:
            pulls = [line for line in after["messages"][0]["content"].splitlines()
                     if line.startswith("Pull ")]
            assert len(pulls) == after["step"]
            assert all(line in before["messages"][0]["content"] for line in pulls[:-1])
            if before["chosen"]:  # the pull the agent chose is the one the history shows
                assert pulls[-1].startswith(f"Pull {after['step']}: machine {before['chosen']},")
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    vectors_main(["--url", server.base_url, "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
                  "compute", "east", "--prompts", str(path), "--layer", "15", "--name",
                  "explore-runs", "--samples", "6", "--action-pattern", ACTION_PATTERN])
    stored = httpx.get(f"{server.base_url}/v1/steering/vectors/explore-runs",
                       headers=headers).json()
    stats = json.loads(stored["source"].split(": ", 1)[1])
    assert stats["centring"] == "run" and stats["runs"] == 2 and stats["prompts"] == 6
    assert stored["norm"] == pytest.approx(stats["raw_norm"], rel=1e-5)  # not rescaled


def test_steered_prompts_never_reuse_unsteered_prefix_cache(openai_client, hf_model, vectors):
    """A long prompt (several full KV blocks) is cached by an unsteered request first; the
    same prompt steered on all positions must not reuse those blocks (cache_salt), so it still
    equals the HF reference steered from the first token."""
    prompt = "Here is a list of things to pack for a trip to the mountains: " * 40
    plain = complete(openai_client, prompt, max_tokens=8)
    assert plain["token_ids"]
    steered = complete(openai_client, prompt, {"east": {
        "vector": "dir-a", "scale": 4.0, "positions": "all"}}, max_tokens=8)
    reference = hf_steered_greedy(hf_model, steered["prompt_token_ids"], 8,
                                  [(vectors["dir-a"], 4.0, LAYER)], all_positions=True)
    assert len(steered["prompt_token_ids"]) > 4 * 128  # several KV blocks (32 tokens on CPU)
    assert steered["token_ids"] == reference


def test_hidden_states_at_the_steered_layer_across_requests(openai_client, hf_model, vectors):
    """Capturing the very layer being steered, request after request, returns the stream with
    the steering added once. (transformers records hidden_states through hooks of its own, so
    whether a forward hook's edit of that same layer shows up there depends on hook order; the
    reference here is read by a second hook registered after the steering one.)"""
    model, _ = hf_model
    for prompt in ["A fresh prompt about cats and dogs", "Another new prompt about the sea",
                   "A fresh prompt about cats and dogs"]:
        reply = complete(openai_client, prompt, {"east": {"vector": "dir-b", "scale": 3.0},
                                                 "return_hidden_states": [LAYER]}, max_tokens=3)
        ids = reply["prompt_token_ids"]
        seen = {}

        def add(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, len(ids) - 1:] += 3.0 * vectors["dir-b"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        def record(module, args, output):
            seen["stream"] = (output[0] if isinstance(output, tuple) else output)[0, -1].clone()
        hooks = [model.model.layers[LAYER].register_forward_hook(add),
                 model.model.layers[LAYER].register_forward_hook(record)]
        try:
            with torch.no_grad():
                model(torch.tensor([ids]))
        finally:
            for hook in hooks:
                hook.remove()
        expected = seen["stream"]
        got = torch.tensor(reply["steering"]["hidden_states"][str(LAYER)])
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max()), prompt
