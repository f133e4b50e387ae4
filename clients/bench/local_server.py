"""Start and stop servers on loopback for tests, benchmarks and experiments."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A server process in its own session (so stopping it stops its engine processes too)."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict | None = None) -> None:
        """`cmd` gets `--port PORT` appended; `env` adds to (or replaces) the environment."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [*cmd, "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})

    def log_tail(self, lines: int = 60, without: str | None = None) -> str:
        """The log's last `lines`, leaving out those that contain `without`."""
        kept = [line for line in self.log_path.read_text(errors="replace").splitlines()
                if without is None or without not in line]
        return "\n".join(kept[-lines:])

    def wait_healthy(self, timeout: float = 900) -> LocalServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited during start-up:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def steer_server(log_path: Path, *extra: str, api_key: str | None = None,
                 admin_key: str | None = None, env: dict | None = None) -> LocalServer:
    """`steer serve` in vLLM's default (compiled) mode, artifacts in a folder beside the log;
    `env` adds to its environment."""
    cmd = [sys.executable, "-m", "clients.cli", "serve",
           "--artifacts-dir", str(log_path.parent / "artifacts"), *extra]
    if api_key:
        cmd += ["--api-key", api_key]
    if admin_key:
        cmd += ["--admin-key", admin_key]
    return LocalServer(cmd, log_path, env).wait_healthy()
