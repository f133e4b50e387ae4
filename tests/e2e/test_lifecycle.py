"""A server's life on its own artifacts folder: uploads, SIGTERM with requests in flight (they
finish; no engine process outlives the server), a restart (every artifact back, a corrupt file
and a killed write's leftovers skipped), an HTTP reward scorer that is not there (a 502, at
once), then its engine process killed (503s and a failing /health within seconds, not hangs).

These tests are about processes and files, not the model's numerics, so the server runs eager
(`--enforce-eager`), which halves each of the two starts on CPU."""

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import psutil
import pytest

from clients.bench.local_server import steer_server
from clients.bench.reward_scorer import ScorerHandler, scorer_url
from tests.conftest import ADMIN_KEY, API_KEY
from tests.prometheus import metric

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYS = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "SmolLM2-135M-Instruct"
# The SIGTERM test's plain requests: they run after the signal, one after the other, well
# within the server's 30 s grace.
LONG = 64
NEVER = "\u2603\u2603\u2603"  # a particle step delimiter the model does not write


def start(folder, name: str, scorer: str, *extra: str):
    return steer_server(folder / f"{name}.log", "--enforce-eager", "--reward-url", scorer,
                        "--reward-timeout", "2", *extra, api_key=API_KEY, admin_key=ADMIN_KEY)


def session_members(server) -> list[psutil.Process]:
    """Every live process of the server's session (it started one: engine, workers, trackers
    are all in it unless they escaped)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == server.process.pid and process.status() != "zombie":
                members.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""


def reap(server) -> None:
    """After a failed test: stop whatever of the server's session is left."""
    server.stop()
    for process in session_members(server):
        process.kill()


def wait_until(condition, timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def gauge(server, name: str) -> float:
    """A metric's value, summed over its label sets."""
    return metric(httpx.get(f"{server.base_url}/metrics").text, name)


def running(server) -> float:
    return gauge(server, "vllm:num_requests_running")


def waiting(server) -> float:
    return gauge(server, "vllm:num_requests_waiting")


def held(server) -> float:
    """Sequences admitted and not yet answered: the server's own count, exact at each
    request's admission and answer (vLLM's gauges follow engine steps)."""
    return gauge(server, "steer_held_sequences")


def outcomes_so_far(server, flights) -> str:
    """Why a wait for admissions failed: each request's outcome and the server's log."""
    return (f"held {held(server)}; outcomes: "
            f"{[str(f.result())[:300] if f.done() else 'running' for f in flights]}\n"
            + server.log_tail(80, without='"GET /metrics'))


def completion(server, stream: bool = False, **body) -> dict:
    """One request's outcome: status and body, or the stream's events; and when the answer
    (a stream's last event) arrived."""
    payload = {"model": MODEL, "prompt": "Tell me a long story about a ship.", "max_tokens": 48,
               "ignore_eos": True, "stream": stream, **body}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=payload, headers=KEYS,
                      timeout=120) as response:
        if not stream:
            return {"status": response.status_code, "body": json.loads(response.read()),
                    "retry_after": response.headers.get("retry-after"),
                    "answered": time.monotonic()}
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        return {"status": response.status_code, "events": events, "answered": time.monotonic()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("lifecycle")


@pytest.fixture(scope="module")
def no_scorer():
    """The reward scorer's address: a port held but never listening, so connections to it are
    refused (and no other process can take it meanwhile)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}/score"


class GatedScorer(ScorerHandler):
    """A reward scorer that answers only once the test opens its gate: a particle request
    scoring its first step stays in flight until then, however fast or slow the machine."""

    asked = threading.Event()
    gate = threading.Event()

    def scores(self, trajectories: list[str]) -> list[float]:
        type(self).asked.set()
        type(self).gate.wait(120)
        return [0.5] * len(trajectories)


@pytest.fixture(scope="module")
def gated_scorer():
    with scorer_url(GatedScorer) as url:
        yield url
        GatedScorer.gate.set()


@pytest.fixture(scope="module")
def first_life(folder, gated_scorer):
    """Uploads, deletes a bundled vector, then SIGTERM (to the server process only, as
    container runtimes do) with three requests in flight, none able to finish until the test
    lets it: a particle filter waiting on its reward scorer, whose gate the test opens only
    after the signal, and a plain and a streamed completion waiting in the engine's queue
    (this server runs one sequence at a time) behind a long stream that the test leaves only
    after the signal."""
    server = start(folder, "first", gated_scorer, "--reward-timeout", "120",
                   "--max-num-seqs", "1", "--max-queued-requests", "8")
    try:
        probe = httpx.get(f"{server.base_url}/v1/steering/probes/default", headers=KEYS,
                          params={"include_weights": True}).json()
        uploads = {
            "vectors": httpx.post(f"{server.base_url}/v1/steering/vectors", headers=ADMIN, json={
                "name": "durable", "values": [i / 576 for i in range(576)], "layer": 3}).json(),
            "probes": httpx.post(f"{server.base_url}/v1/steering/probes", headers=ADMIN, json={
                "name": "durable-probe", "weights": probe["weights"],
                "thresholds": probe["thresholds"]}).json(),
        }
        assert httpx.delete(f"{server.base_url}/v1/steering/vectors/explore",
                            headers=ADMIN).status_code == 200
        with ThreadPoolExecutor(3) as pool:
            flights = [pool.submit(completion, server, max_tokens=8, steering={
                "particles": {"n": 2, "max_steps": 1, "reward": "http",
                              "step_delimiter": NEVER}})]
            assert GatedScorer.asked.wait(60), outcomes_so_far(server, flights)
            with httpx.stream("POST", f"{server.base_url}/v1/completions", headers=KEYS,
                              timeout=120, json={"model": MODEL, "prompt": "Hi", "stream": True,
                                                 "max_tokens": 4000, "ignore_eos": True}
                              ) as blocker:
                events = blocker.iter_lines()  # kept: a dropped iterator closes the stream
                next(events)  # it runs, in the only place, for minutes
                flights += [pool.submit(completion, server, max_tokens=LONG),
                            pool.submit(completion, server, stream=True, max_tokens=LONG)]
                assert wait_until(lambda: waiting(server) == 2, 60), \
                    outcomes_so_far(server, flights)
                assert held(server) == 5  # 2 particles, the blocker, the 2 queued
                members = [command(p) for p in session_members(server)]
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                GatedScorer.gate.set()
            exit_code = server.process.wait(90)  # the blocker left: the queue runs
            stopped = time.monotonic() - signalled
            outcomes = [flight.result() for flight in flights]
    finally:
        GatedScorer.gate.set()
        reap(server)
    return {"server": server, "uploads": uploads, "outcomes": outcomes, "exit_code": exit_code,
            "members": members, "signalled": signalled, "stopped_s": stopped}


def test_sigterm_lets_in_flight_requests_finish(first_life):
    particles, plain, streamed = first_life["outcomes"]
    signalled = first_life["signalled"]
    # each was answered after the signal: it was in flight when the signal came
    assert min(o["answered"] for o in first_life["outcomes"]) > signalled
    assert plain["status"] == 200, plain
    assert plain["body"]["usage"]["completion_tokens"] == LONG
    assert streamed["status"] == 200 and streamed["events"][-1] == "[DONE]"
    chunks = [json.loads(e) for e in streamed["events"][:-1]]
    assert all("error" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert particles["status"] == 200 and "particles" in particles["body"]["choices"][0][
        "steering"]
    # uvicorn re-raises the signal once shut down, so the exit status is SIGTERM's
    assert first_life["exit_code"] in (0, -signal.SIGTERM) and first_life["stopped_s"] < 60
    assert "Application shutdown complete" in first_life["server"].log_tail()


def test_no_engine_process_outlives_the_server(first_life):
    assert any("EngineCore" in c for c in first_life["members"])  # it ran in the session
    server = first_life["server"]
    assert wait_until(lambda: not session_members(server), 30), [
        command(p) for p in session_members(server)]


@pytest.fixture(scope="module")
def second_life(first_life, folder, no_scorer):
    """The same artifacts folder again, with a corrupt artifact and a killed write's temporary
    file added while the server was down."""
    vectors = folder / "artifacts" / "vectors"
    (vectors / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    (vectors / ".durable.safetensors.abc123.tmp").write_bytes(b"half a file")
    server = start(folder, "second", no_scorer, "--strict-fields",
                   "--scheduling-policy", "priority", "--max-num-seqs", "2")
    yield server
    reap(server)


@pytest.mark.parametrize("kind, name, detail", [("vectors", "durable", "include_values"),
                                                ("probes", "durable-probe", "include_weights")])
def test_restart_restores_every_artifact(first_life, second_life, kind, name, detail):
    url = f"{second_life.base_url}/v1/steering/{kind}"
    listed = {r["id"] for r in httpx.get(url, headers=KEYS).json()["data"]}
    before = first_life["uploads"][kind]
    assert name in listed
    again = httpx.get(f"{url}/{name}", headers=KEYS, params={detail: True}).json()
    assert {k: again[k] for k in before} == before  # same metadata, creation time included
    if kind == "vectors":
        assert again["values"] == pytest.approx([i / 576 for i in range(576)])
        assert "explore" not in listed  # a deletion is durable too
        assert "corrupt" not in listed


def test_restart_skips_a_corrupt_file_and_removes_leftovers(second_life, folder):
    log = second_life.log_path.read_text()
    assert "skipping steering vector corrupt.safetensors" in log
    assert "removing .durable.safetensors.abc123.tmp" in log
    assert not list((folder / "artifacts" / "vectors").glob("*.tmp"))
    assert httpx.get(f"{second_life.base_url}/health").status_code == 200


def test_strict_fields_refuses_unknown_fields(second_life):
    """`--strict-fields` (this server has it): an unknown top-level field is a 400 naming it;
    `null` for a known one still means unset."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = httpx.post(f"{second_life.base_url}/v1/chat/completions", headers=KEYS, timeout=60,
                   json={**body, "frobnicate": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    r = httpx.post(f"{second_life.base_url}/v1/chat/completions", headers=KEYS, timeout=60,
                   json={**body, "temperature": None})
    assert r.status_code == 200 and "x-steer-ignored-fields" not in r.headers


def test_unreachable_reward_scorer_is_a_502_at_once(second_life):
    started = time.monotonic()
    r = httpx.post(f"{second_life.base_url}/v1/chat/completions", headers=KEYS, timeout=60, json={
        "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 16,
        "steering": {"particles": {"n": 2, "max_steps": 2, "reward": "http"}}})
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["type"] == "upstream_error" and "reward scorer" in error["message"]
    assert "ConnectError" in error["message"] and time.monotonic() - started < 20


def test_overload_is_a_429_at_once_and_admitted_requests_finish(second_life):
    """This server runs 2 sequences at once and lets 2 more wait (`--max-queued-requests`'s
    default: one more batch). With 4 long requests holding every place, 8 more are refused at
    once with 429 and Retry-After while the 4 are still held, /health 200 throughout; the 4
    are answered; then every hold is given back (a client that left mid-stream included), so
    4 at once are admitted again, with the KV cache empty and the API process's memory back
    near its level; their holds are back by the time their answers arrive."""
    server = second_life

    def timed(**body):
        started = time.monotonic()
        outcome = completion(server, **body)
        return outcome, time.monotonic() - started

    assert gauge(server, "steer_sequence_limit") == 4
    api = psutil.Process(server.process.pid)
    rss_before = api.memory_info().rss
    with ThreadPoolExecutor(12) as pool:
        admitted = [pool.submit(timed, max_tokens=300) for _ in range(4)]
        assert wait_until(lambda: held(server) == 4, 30)
        refused = [f.result() for f in [pool.submit(timed, max_tokens=8) for _ in range(8)]]
        assert held(server) == 4  # every refusal came while all 4 places were taken
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
        answered = [f.result()[0] for f in admitted]
    for outcome, seconds in refused:
        assert outcome["status"] == 429, outcome
        error = outcome["body"]["error"]
        assert error["type"] == "rate_limit_error" and "--max-queued-requests" in \
            error["message"] and outcome["retry_after"] == "1" and seconds < 5
    for outcome in answered:
        assert outcome["status"] == 200 and len(outcome["body"]["choices"][0]["text"]) > 0
    with httpx.stream("POST", f"{server.base_url}/v1/completions", headers=KEYS, json={
            "model": MODEL, "prompt": "Hi", "max_tokens": 200, "ignore_eos": True,
            "stream": True}, timeout=60) as response:
        next(response.iter_lines())  # then leave
    assert wait_until(lambda: running(server) == 0 and held(server) == 0 and
                      gauge(server, "vllm:kv_cache_usage_perc") == 0, 30)
    assert api.memory_info().rss - rss_before < 50 * 2**20  # the API process's memory too
    with ThreadPoolExecutor(4) as pool:
        again = [f.result()[0]["status"] for f in [pool.submit(timed) for _ in range(4)]]
    assert again == [200] * 4
    assert held(server) == 0  # given back before the answers were sent, not after


def test_priority_orders_the_waiting_queue(second_life):
    """`priority` reaches vLLM's scheduler (this server runs `--scheduling-policy priority`
    with 2 sequences at once): with both slots busy, a request sent second with a lower
    priority value is served first (first come, first served would serve it last). The busy
    pair are streams far longer than the test; the test frees one slot by leaving one stream,
    so neither the machine's speed nor their lengths decide when the queue moves."""
    server = second_life
    assert held(server) == 0 and running(server) == 0
    finished: dict[str, float] = {}

    def timed(name: str, priority: int):
        outcome = completion(server, max_tokens=4, priority=priority)
        finished[name] = time.monotonic()
        return outcome

    with ExitStack() as busy, ThreadPoolExecutor(2) as pool:
        streams = [busy.enter_context(httpx.stream(
            "POST", f"{server.base_url}/v1/completions", headers=KEYS, timeout=120, json={
                "model": MODEL, "prompt": "Tell me a long story about a ship.",
                "max_tokens": 4000, "ignore_eos": True, "stream": True})) for _ in range(2)]
        assert wait_until(lambda: running(server) >= 2, 60), outcomes_so_far(server, [])
        later = pool.submit(timed, "later", 5)
        assert wait_until(lambda: waiting(server) >= 1, 30), outcomes_so_far(server, [later])
        sooner = pool.submit(timed, "sooner", -5)
        assert wait_until(lambda: waiting(server) >= 2, 30), \
            outcomes_so_far(server, [later, sooner])
        assert running(server) == 2 and not finished  # both still queued behind the busy pair
        streams[0].close()  # one slot frees: the queue's order decides who takes it
        outcomes = [later.result(), sooner.result()]
    assert [o["status"] for o in outcomes] == [200] * 2
    assert finished["sooner"] < finished["later"]
    assert wait_until(lambda: running(server) == 0 and held(server) == 0, 30)


def test_engine_death_gives_503s_not_hangs(second_life):
    """Last in this module: the server is left without an engine. Both requests are far
    longer than the test, so both are still generating when the engine dies, on any machine."""
    server = second_life
    engines = [p for p in session_members(server) if "EngineCore" in command(p)]
    assert len(engines) == 1
    with ThreadPoolExecutor(2) as pool:
        flights = [pool.submit(completion, server, max_tokens=4000),
                   pool.submit(completion, server, stream=True, max_tokens=4000)]
        assert wait_until(lambda: running(server) >= 2, 30)
        engines[0].kill()
        killed = time.monotonic()
        plain, streamed = [flight.result(timeout=30) for flight in flights]
    assert wait_until(lambda: httpx.get(f"{server.base_url}/health").status_code == 503, 10)
    assert time.monotonic() - killed < 15
    health = httpx.get(f"{server.base_url}/health").json()
    assert health["error"]["type"] == "service_unavailable"
    assert plain["status"] == 503 and plain["body"]["error"]["type"] == "service_unavailable", \
        str(plain)[:500]
    error = json.loads(streamed["events"][-2])["error"]  # in-band, then [DONE]
    assert error["code"] == 503 and streamed["events"][-1] == "[DONE]"
    started = time.monotonic()
    r = httpx.post(f"{server.base_url}/v1/chat/completions", headers=KEYS, timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 503 and time.monotonic() - started < 5
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert gauge(server, "steer_engine_up") == 0
    # the engine's workers follow it; the API process stays up to answer 503s
    assert wait_until(lambda: not [p for p in session_members(server) if "VLLM" in command(p)],
                      30)
    assert server.process.poll() is None
