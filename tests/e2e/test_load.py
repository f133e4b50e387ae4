"""The load test (clients/loadtest.py) at a small size against the session server: every
steering mode mixed with plain requests, none fails, greedy requests give their solo output,
the engine is idle afterwards. docs/hardening.md has the full-size run."""

import asyncio

from clients.loadtest import MODES, markdown, passed, run
from tests.conftest import API_KEY


def test_mixed_load_loses_nothing(server):
    report = asyncio.run(run(server.base_url, {"Authorization": f"Bearer {API_KEY}"},
                             requests=64, concurrency=16, max_tokens=16, prompts=4,
                             server_pid=server.process.pid, progress=lambda _: None))
    print(markdown(report, "tests/e2e/test_load.py"))
    assert report["failures"] == 0, report["failed"]
    assert report["mismatches"] == 0, report["mismatched"]
    assert report["engine_idle_after"]
    assert passed(report)
    assert all(mode["count"] >= 64 // len(MODES) for mode in report["modes"].values())
    assert report["greedy_checked"] == sum(
        mode["count"] for name, mode in report["modes"].items() if MODES[name].greedy)
    memory = report["memory_rss_mib"]
    assert memory["peak"] >= memory["before"] > 0
    assert memory["after"] < memory["before"] * 1.25  # no gross leak
