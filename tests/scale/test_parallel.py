"""Data and tensor parallelism keep every steering feature: the same requests answered by a
server with two engines (`--data-parallel-size 2`) or two workers per engine
(`--tensor-parallel-size 2`) equal the single-engine answers.

Data parallelism runs the bundled model. Its 9 attention heads do not split over 2 ranks, so
tensor parallelism runs a small Llama with random weights (4 heads, 2 KV heads) built here with
the bundled tokenizer: its text means nothing, but TP = 2 must reproduce TP = 1 on it.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from clients.bench.local_server import steer_server
from tests.scale.conftest import ADMIN_KEY, client

pytestmark = pytest.mark.scale

PROMPT = "My plan for the weekend:"
QUESTION = "What is 12 times 7?"


def completion(steering: dict, **fields) -> tuple[str, dict]:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "return_token_ids": True,
            **fields, "steering": {"return_entropy": True, **steering}}
    return "/v1/completions", body


KINDS = {
    "plain": completion({}),
    "typical": completion({}, typical_p=0.5, temperature=0.9, seed=3),
    "east": completion({"east": {"vector": "explore", "scale": 4.0}}),
    "hidden_states": completion({"return_hidden_states": [3, "final"]}, max_tokens=2),
    "gates": completion({"gates": [{"signal": "entropy", "above": 2.0,
                                    "then": {"temperature": 0.2}}]}, temperature=1.0, seed=4),
    "vreason": completion({"vreason": {"every": 4}}),
    "diffadapt": ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, "seed": 5,
        "logprobs": True, "steering": {"return_entropy": True,
                                       "diffadapt": {"probe": "default"}}}),
}


def answer(http, kind: str) -> dict:
    path, body = KINDS[kind]
    r = http.post(path, json=body)
    assert r.status_code == 200, (kind, r.text)
    choice = r.json()["choices"][0]
    report = choice["steering"]
    tokens = choice.get("token_ids") or [c["token"] for c in choice["logprobs"]["content"]]
    return {"tokens": tokens, "entropy": report["token_entropy"],
            "hidden": report.get("hidden_states"), "report": report}


def assert_same(got: dict, expected: dict, kind: str, tolerance: float) -> None:
    assert got["tokens"] == expected["tokens"], kind
    assert got["entropy"] == pytest.approx(expected["entropy"], abs=tolerance), kind
    if expected["hidden"] is not None:
        for layer, values in expected["hidden"].items():
            assert got["hidden"][layer] == pytest.approx(values, rel=1e-3, abs=tolerance), kind
    report, reference = got["report"], expected["report"]
    if "gates" in reference:
        assert [g["fired"] for g in report["gates"]["gates"]] == [
            g["fired"] for g in reference["gates"]["gates"]], kind
    if "diffadapt" in reference:
        assert report["diffadapt"]["difficulty"] == reference["diffadapt"]["difficulty"], kind
        assert report["diffadapt"]["probabilities"] == pytest.approx(
            reference["diffadapt"]["probabilities"], abs=tolerance), kind
    if "vreason" in expected["report"]:
        assert [u["token"] for u in got["report"]["vreason"]["updates"]] == [
            u["token"] for u in expected["report"]["vreason"]["updates"]], kind


def engines_that_ran(http) -> set[str]:
    text = http.get("/metrics").text
    return {m.group(1) for m in re.finditer(
        r'^vllm:request_success_total\{[^}]*engine="(\d+)"[^}]*\} ([0-9.e+]+)$', text, re.M)
        if float(m.group(0).rsplit(" ", 1)[1]) > 0}


@pytest.fixture(scope="module")
def data_parallel(folder):
    server = steer_server(folder / "dp.log", "--data-parallel-size", "2", admin_key=ADMIN_KEY)
    with client(server) as http:
        yield http
    server.stop()


def test_data_parallel_serves_every_method_as_one_engine_does(single, data_parallel):
    expected = {kind: answer(single, kind) for kind in KINDS}
    # Each kind twice at once: the two engines share the work, and both answers must match.
    with ThreadPoolExecutor(4) as pool:
        for kind in KINDS:
            for got in pool.map(lambda _, k=kind: answer(data_parallel, k), range(2)):
                assert_same(got, expected[kind], kind, tolerance=1e-4)
    assert engines_that_ran(data_parallel) == {"0", "1"}


def test_data_parallel_particles_run(data_parallel):
    r = data_parallel.post("/v1/completions", json={
        "prompt": QUESTION, "max_tokens": 16, "seed": 2,
        "steering": {"particles": {"n": 2, "max_steps": 2, "step_delimiter": " "}}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["steering"]["particles"]["steps"]


@pytest.fixture(scope="module")
def random_llama(folder):
    """A Llama whose heads split over 2 ranks, random weights (seeded), the bundled tokenizer;
    4 layers, so every layer the kinds above name (3 at most) exists in it too."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from server.default_model import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    path = folder / "random-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def start(folder, name, model, *args):
    """A server of `model` with an artifacts folder of its own (not the bundled model's)."""
    return steer_server(folder / f"{name}.log", "--model", str(model), "--max-model-len", "2048",
                        "--artifacts-dir", str(folder / f"{name}-artifacts"), *args,
                        admin_key=ADMIN_KEY)


TP_KINDS = ["plain", "typical", "east", "hidden_states", "gates"]


def test_tensor_parallel_equals_one_worker(folder, random_llama):
    import torch

    results = {}
    vector = (torch.randn(256, generator=torch.Generator().manual_seed(1)) * 8).tolist()
    for name, args in (("tp1", ()), ("tp2", ("--tensor-parallel-size", "2"))):
        server = start(folder, name, random_llama, *args)
        try:
            with client(server) as http:
                r = http.post("/v1/steering/vectors", json={
                    "name": "explore", "values": vector, "layer": 2})
                assert r.status_code == 201, r.text
                results[name] = {kind: answer(http, kind) for kind in TP_KINDS}
                if name == "tp2":
                    path, body = KINDS["vreason"]
                    refused = http.post(path, json=body)
                    assert refused.status_code == 400
                    assert "no tensor or pipeline parallelism" in refused.json()["error"][
                        "message"]
                    assert "V-Reason is not available" in server.log_path.read_text()
        finally:
            server.stop()
    for kind in TP_KINDS:
        assert_same(results["tp2"][kind], results["tp1"][kind], kind, tolerance=1e-3)
