"""Shared fixtures: one real server (vLLM engine + bundled model) per test session."""

from __future__ import annotations

import time
import zlib

import httpx
import pytest

from clients.bench.local_server import LocalServer, steer_server
from clients.bench.reward_scorer import ScorerHandler, scorer_url

API_KEY = "test-key"
ADMIN_KEY = "test-admin-key"
REWARD_TIMEOUT_S = 2.0


@pytest.fixture(scope="session")
def prm_path(tmp_path_factory):
    """A sequence-classifier reward model to serve with --prm: the bundled model's body with a
    seeded random one-label head (a real checkpoint of the kind real PRMs use; its scores mean
    nothing, the tests compare them with HF's)."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from server.default_model import ensure_default_model

    source = ensure_default_model()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(source, num_labels=1,
                                                           dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    path = tmp_path_factory.mktemp("prm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def server(tmp_path_factory, reward_scorer, prm_path) -> LocalServer:
    _, reward_url = reward_scorer
    proc = steer_server(tmp_path_factory.mktemp("server") / "server.log",
                        "--reward-url", reward_url, "--reward-timeout", str(REWARD_TIMEOUT_S),
                        "--prm", str(prm_path), api_key=API_KEY, admin_key=ADMIN_KEY,
                        env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"})  # as vLLM stores them
    yield proc
    proc.stop()


class _Scorer(ScorerHandler):
    """Scores a trajectory by its share of digits; `mode` switches to flat (0.5 for all),
    spread (a hash of the text: far apart), mild (0.4 to 0.6), slow (sleeps past the server's
    timeout) or broken (500) answers."""

    mode = "ok"
    calls = 0

    @classmethod
    def score(cls, text: str) -> float:
        if cls.mode == "flat":
            return 0.5
        if cls.mode in ("spread", "mild"):  # far apart, or all near 0.5
            share = (zlib.crc32(text.encode()) % 1000 + 0.5) / 1000
            return share if cls.mode == "spread" else 0.4 + 0.2 * share
        return sum(c.isdigit() for c in text) / max(1, len(text))

    def scores(self, trajectories: list[str]) -> list[float] | None:
        type(self).calls += 1
        if self.mode == "slow":
            time.sleep(REWARD_TIMEOUT_S * 3)
        if self.mode == "broken":
            return None
        return [self.score(t) for t in trajectories]


@pytest.fixture(scope="session")
def reward_scorer():
    """A reward service on loopback (class `_Scorer`; set `.mode` to change its behaviour)."""
    with scorer_url(_Scorer) as url:
        yield _Scorer, url


def _answer_matches_its_response_model(response: httpx.Response) -> None:
    """Every JSON answer of a generation route the tests get is what /openapi.json says it is
    (vLLM's answer and the typed `steering` report, which allows no undocumented key)."""
    from server.anthropic_messages import MessagesResponse
    from server.openai_responses import SteeredResponse
    from server.responses import ChatCompletionResponse, CompletionResponse

    model = {"/v1/chat/completions": ChatCompletionResponse,
             "/v1/chat/completions/batch": ChatCompletionResponse,
             "/v1/completions": CompletionResponse, "/v1/responses": SteeredResponse,
             "/v1/messages": MessagesResponse}.get(response.request.url.path)
    if model is not None and response.status_code == 200 and \
            response.headers.get("content-type", "").startswith("application/json"):
        response.read()
        model.model_validate(response.json())


def _client(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=120,
                        headers={"Authorization": f"Bearer {key}"},
                        event_hooks={"response": [_answer_matches_its_response_model]})


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with _client(server, API_KEY) as client:
        yield client


@pytest.fixture(scope="session")
def admin_http(server) -> httpx.Client:
    with _client(server, ADMIN_KEY) as client:
        yield client


@pytest.fixture(scope="session")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="session")
def async_openai(server):
    """A factory: each event loop (each asyncio.run) needs its own AsyncOpenAI client."""
    import openai

    return lambda: openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY,
                                      max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def hf_model():
    """The same bundled model in HF transformers, float32: the reference implementation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.default_model import ensure_default_model

    path = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)
