"""Shared fixtures: one real server (vLLM engine + bundled model) per test session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
ADMIN_KEY = "test-admin-key"
START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, port: int, log_path: Path, process: subprocess.Popen):
        self.port, self.log_path, self.process = port, log_path, process
        self.base_url = f"http://127.0.0.1:{port}"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(log_path: Path, *extra: str, api_key: str | None = API_KEY,
                 admin_key: str | None = ADMIN_KEY) -> ServerProcess:
    """`steer serve` in vLLM's default (compiled) mode, artifacts in a folder of its own."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
           "--artifacts-dir", str(log_path.parent / "artifacts"), *extra]
    if api_key:
        cmd += ["--api-key", api_key]
    if admin_key:
        cmd += ["--admin-key", admin_key]
    log = open(log_path, "w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    server = ServerProcess(port, log_path, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"server did not become healthy:\n{server.log_tail()}")


def stop_server(server: ServerProcess) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    proc = start_server(tmp_path_factory.mktemp("server") / "server.log")
    yield proc
    stop_server(proc)


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
