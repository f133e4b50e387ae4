"""Shared fixtures: one real server (vLLM engine + bundled model) per test session."""

from __future__ import annotations

import httpx
import pytest

from clients.local_server import LocalServer, steer_server

API_KEY = "test-key"
ADMIN_KEY = "test-admin-key"


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> LocalServer:
    proc = steer_server(tmp_path_factory.mktemp("server") / "server.log", api_key=API_KEY,
                        admin_key=ADMIN_KEY)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


@pytest.fixture(scope="session")
def admin_http(server) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
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
