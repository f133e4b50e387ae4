"""The load test (clients/loadtest.py) at a small size against the session server: every
steering mode mixed with plain requests, none fails, every request (greedy or seeded) gives its
solo text and per-token entropy, the engine is idle afterwards. docs/hardening.md has the
full-size run."""

import asyncio

from clients.bench.loadtest import MODES, markdown, passed, run
from tests.conftest import API_KEY


def test_mixed_load_loses_nothing(server):
    report = asyncio.run(run(server.base_url, {"Authorization": f"Bearer {API_KEY}"},
                             requests=64, concurrency=16, max_tokens=16, prompts=4,
                             server_pid=server.process.pid, progress=lambda _: None))
    print(markdown(report, "tests/e2e/test_load.py"))
    assert report["failures"] == 0, report["failed"]
    assert report["mismatches"] == 0, report["mismatched"]
    assert report["engine_idle_after"]
    assert report["peak_running"] >= 8  # the requests really shared engine steps
    assert passed(report)
    assert all(mode["count"] >= 64 // len(MODES) for mode in report["modes"].values())
    assert report["checked"] == 64
    assert report["entropy_checked"] == sum(
        mode["count"] for name, mode in report["modes"].items()
        if MODES[name].body.get("steering", {}).get("return_entropy"))
    memory = report["memory_rss_mib"]
    assert memory["peak"] >= memory["before"] > 0
    assert memory["after"] < memory["before"] * 1.25  # no gross leak


def test_soak_mode_reports_windows_and_memory_slopes(server):
    """`--duration`: the load is kept up for a time; latency per window, each server process's
    memory slope, and the same no-failure, no-difference checks."""
    report = asyncio.run(run(server.base_url, {"Authorization": f"Bearer {API_KEY}"},
                             requests=0, concurrency=8, max_tokens=8, prompts=2,
                             server_pid=server.process.pid, progress=lambda _: None,
                             duration_s=24, window_s=12))
    print(markdown(report, "tests/e2e/test_load.py (soak)"))
    assert passed(report), (report["failed"], report["mismatched"])
    assert [w["start_s"] for w in report["windows"]][:2] == [0, 12]
    assert sum(w["requests"] for w in report["windows"]) == report["requests"] > 8
    assert all(w["rss_mib"] > 0 for w in report["windows"][:2])
    processes = report["processes"]
    assert len(processes) >= 2
    for process in processes:  # sampled every 3 s: enough for both slopes
        assert process["slope_mib_per_hour"] is not None
        assert process["slope_after_first_window_mib_per_hour"] is not None
        assert len(process["window_end_mib"]) == len(report["windows"])
        assert process["window_end_mib"][-1] == process["last_mib"]
