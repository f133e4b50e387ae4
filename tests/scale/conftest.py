"""Servers for `make test-scale`: a single-engine reference, and servers with several engines
or workers, each started once per session (in this order, so at most two engines' workers
share the machine's cores at a time besides the reference)."""

from __future__ import annotations

import httpx
import pytest

from clients.bench.local_server import steer_server

ADMIN_KEY = "scale-admin-key"


def client(server) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=600,
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"})


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("scale")


@pytest.fixture(scope="session")
def single(folder):
    """One engine, TP = DP = 1: the reference; its artifacts are in folder / "artifacts"."""
    server = steer_server(folder / "single.log", admin_key=ADMIN_KEY)
    with client(server) as http:
        yield http
    server.stop()
