"""Hostile input. Every route of the server's own OpenAPI schema is fuzzed with schemathesis
(schema-valid and schema-invalid data): no 5xx, no hang, every error an OpenAI error body as the
schema documents. Then the inputs a schema fuzzer does not make: oversized, chunked, deeply
nested and non-UTF-8 bodies, and artifact names that try to leave the artifacts folder."""

import http.client
import json
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.errors import FailureGroup

from tests.conftest import ADMIN_KEY, API_KEY

EXAMPLES = 30  # per operation and mode
# Off: a schema-valid request may still be refused for what only the server knows (a prompt
# token id beyond this model's vocabulary, a prompt beyond its context, an artifact name that
# is not stored); those refusals are tested where they are made.
CONFIG = schemathesis.Config.from_dict({"checks": {"positive_data_acceptance": {"enabled": False}}})
GENERATION = {"/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch",
              "/invocations", "/v1/responses", "/v1/messages"}
BUNDLED = {"explore", "default"}  # other tests use them: the fuzzer must not replace or delete
LIMITS = {"max_tokens": 4, "max_completion_tokens": 4, "max_output_tokens": 4, "n": 2}
STEERING_LIMITS = {"particles": {"n": 2, "max_steps": 2},
                   "deepconf": {"budget": 2, "warmup": 2, "parallel": 2},
                   "vreason": {"steps": 1}}  # 8 steps per token on a long prompt: a minute


def _clamp(values: dict, limits: dict) -> None:
    for key, limit in limits.items():
        value = values.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            values[key] = limit


def bounded(case, negative: bool) -> None:
    """Keep each generated case cheap to serve: generation routes make at most 2 × 4 tokens per
    prompt (and 2 prompts, 2 particles × 2 steps, 2 DeepConf traces, 1 V-Reason step per update),
    where the schema
    allows the whole context; values the server must reject stay as they are. The bundled
    artifacts other tests need keep their names. A schema-invalid (`negative`) case only gets
    a budget where it has none and may have none: cutting a list or lowering a value could make
    it valid (a third conversation that breaks the schema, cut off), and the server must reject
    it as made."""
    for values in (case.path_parameters, case.body):
        if isinstance(values, dict) and isinstance(values.get("name"), str) and \
                values["name"] in BUNDLED:
            values["name"] += "-fuzz"
    body = case.body
    if not isinstance(body, dict) or case.path not in GENERATION:
        return
    limit = "max_output_tokens" if case.path == "/v1/responses" else "max_tokens"
    required = case.path == "/v1/messages"  # Anthropic's max_tokens: its absence is invalid
    if not (negative and required) and all(body.get(key) is None for key in (
            "max_tokens", "max_completion_tokens", "max_output_tokens")):
        body[limit] = LIMITS[limit]  # unset: the rest of the context
    if negative:
        return
    _clamp(body, LIMITS)
    for key in ("prompt", "messages"):  # at most 2 prompts, or 2 conversations of a batch
        if case.path != "/v1/messages" and isinstance(body.get(key), list) and body[key] \
                and isinstance(body[key][0], (str, list)):
            body[key] = body[key][:2]
    steering = body.get("steering")
    for method, limits in STEERING_LIMITS.items():
        if isinstance(steering, dict) and isinstance(steering.get(method), dict):
            _clamp(steering[method], limits)


MIN_CASES = 10  # per operation that takes input, in each mode


DOCUMENTATION_KEYS = {"title", "description"}


def takes_input(operation) -> bool:
    return bool(operation.definition.raw.get("parameters") or
                operation.definition.raw.get("requestBody"))


def can_be_invalid(operation) -> bool:
    """Whether some input of the operation has a constraint to break: a body, or a parameter
    other than a bare string (a path name takes any string)."""
    raw = operation.definition.raw
    return "requestBody" in raw or any(
        set(p.get("schema", {})) - DOCUMENTATION_KEYS != {"type"} or p["schema"]["type"] != "string"
        for p in raw.get("parameters", []))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_route_survives_fuzzing(server, mode):
    """schemathesis's checks on every operation: no 5xx, status codes, content types, error
    bodies and 200 answers as the schema documents, schema-invalid data rejected. The admin
    key reaches every route; no shrinking, so a failure costs one more call, not hundreds.
    Each operation that takes input gets at least MIN_CASES cases; only operations with no
    constrained input have no invalid data to make (negative mode)."""
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", config=CONFIG)
    failures, calls, unsatisfiable, no_input, unbreakable = {}, Counter(), set(), set(), set()
    operations = []
    for result in schema.get_all_operations():
        operation = result.ok()
        operations.append(operation.label)
        if not takes_input(operation):
            no_input.add(operation.label)
        if not can_be_invalid(operation):
            unbreakable.add(operation.label)

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            bounded(case, mode is GenerationMode.NEGATIVE)
            calls[operation.label] += 1
            case.call_and_validate(base_url=server.base_url, timeout=120,
                                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})

        try:
            fuzz()
        except Unsatisfiable:
            unsatisfiable.add(operation.label)
        except (Exception, FailureGroup) as exc:  # every operation's failure, not the first
            failures[operation.label] = exc
    print(f"{mode.value}: {sum(calls.values())} fuzz cases", dict(calls))
    assert not failures, "\n\n".join(  # hypothesis's notes hold the failing case
        f"{label}:\n{exc}\n" + "\n".join(getattr(exc, "__notes__", []))
        for label, exc in failures.items())
    negative = mode is GenerationMode.NEGATIVE
    assert unsatisfiable == (unbreakable if negative else set())
    fuzzed = set(operations) - (unbreakable if negative else set())
    assert set(calls) == fuzzed
    few = {label: calls[label] for label in fuzzed - (set() if negative else no_input)
           if calls[label] < MIN_CASES}
    assert not few, f"operations fuzzed with fewer than {MIN_CASES} cases: {few}"
    assert GENERATION <= {label.split(" ", 1)[1] for label in calls}


def raw(server, method: str, path: str, body=None, key: str = API_KEY, **headers):
    """One request sent as written (no client-side path normalisation or encoding); an
    iterable body goes out chunked, without a Content-Length."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request(method, path, body=body, encode_chunked=not isinstance(
            body, (bytes, type(None))), headers={"Authorization": f"Bearer {key}",
                                                  "Content-Type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def assert_error(status: int, body: dict, expected: int, param: str | None = None) -> dict:
    assert status == expected, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_oversized_bodies_are_413_with_or_without_a_length(server):
    big = b'{"prompt": "' + b"a" * (9 << 20) + b'"}'
    status, body = raw(server, "POST", "/v1/completions", big)
    assert "limited to" in assert_error(status, body, 413)["message"]
    chunks = (big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20))
    status, body = raw(server, "POST", "/v1/completions", chunks)  # chunked: no length
    assert "limited to" in assert_error(status, body, 413)["message"]


@pytest.mark.parametrize("body, message", [
    (b'{"prompt": "\xff\xfe", "max_tokens": 2}', "not valid UTF-8"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"prompt": "x", "steering": ' + b'{"a": ' * 500 + b"1" + b"}" * 500 + b"}",
     "steering.a"),
    (b'{"prompt": "x",', "malformed JSON"),
])
def test_unparsable_bodies_are_400(server, body, message):
    status, reply = raw(server, "POST", "/v1/completions", body)
    assert message in assert_error(status, reply, 400)["message"]


@pytest.mark.parametrize("body, param", [
    ({"n": 10**6}, "n"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"prompt": ["x"] * 10_000}, "prompt"),
    ({"seed": 10**30}, "seed"),
    ({"top_k": 10**30}, "top_k"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * 1000}, "stop"),
    ({"steering": {"particles": {"n": 10**6}}}, "steering.particles.n"),
    ({"steering": {"particles": {"max_steps": 10**6}}}, "steering.particles.max_steps"),
    ({"steering": {"deepconf": {"budget": 10**6}}}, "steering.deepconf.budget"),
    ({"steering": {"deepconf": {"window": 10**6}}}, "steering.deepconf.window"),
    ({"steering": {"deepconf": {"answer": "x" * 10**4}}}, "steering.deepconf.answer"),
    ({"steering": {"east": [{"vector": "explore"}] * 100}}, "steering.east"),
])
def test_huge_values_are_400_naming_the_field(server, body, param):
    status, reply = raw(server, "POST", "/v1/completions",
                        json.dumps({"prompt": "x", "max_tokens": 2, **body}).encode())
    assert_error(status, reply, 400, param)


@pytest.mark.parametrize("steering,param", [
    ({"particles": {"n": 64}}, None),
    ({"deepconf": {"budget": 64, "warmup": 2}}, "steering.deepconf.budget"),
])
def test_huge_multi_pass_budgets_are_400(server, steering, param):
    status, reply = raw(server, "POST", "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 8000,
        "steering": steering}).encode())
    assert_error(status, reply, 400, param)


def test_a_message_object_without_an_openai_role_is_no_500(http):
    """vLLM also parses Harmony-style message objects (`author`, `recipient`), which have no
    OpenAI role: the fuzzer's crash of the reshape (a pass before generation read every chat
    as dicts). Plain, they are vLLM's to answer; with DiffAdapt there is no question to probe."""
    messages = [{"author": {"role": "user"}, "content": [{"type": "text", "text": "hi"}],
                 "recipient": None}, {"role": "developer", "content": ""}]
    plain = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert plain.status_code < 500, plain.text
    probed = http.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": 2, "steering": {"diffadapt": {"probe": "default"}}})
    assert probed.status_code == 400 and probed.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("kind", ["vectors", "probes"])
@pytest.mark.parametrize("name, status", [
    ("%2e%2e", 400), ("..", 400), (".hidden", 400), ("a%00b", 400), ("%00", 400),
    ("C:%5Cwindows", 400), ("%252e%252e", 400),
    ("..%2F..%2Fetc%2Fpasswd", 404), ("%2Fetc%2Fpasswd", 404), ("../../etc/passwd", 404),
])
def test_artifact_names_cannot_leave_the_folder(server, kind, name, status):
    """Each name is refused by the name rule (400) or matches no route at all (404, an
    encoded or literal '/'); reads and deletes alike."""
    for method in ("GET", "DELETE"):
        code, reply = raw(server, method, f"/v1/steering/{kind}/{name}", key=ADMIN_KEY)
        assert_error(code, reply, status, "name" if status == 400 else None)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a\x00b", "..", "x/../../y", "C:\\x",
                                  ".steer", "x" * 65])
def test_uploads_with_path_names_are_400_and_write_nothing(server, admin_http, name):
    artifacts = server.log_path.parent / "artifacts"
    before = sorted(p for p in server.log_path.parent.rglob("*"))
    r = admin_http.post("/v1/steering/vectors", json={"name": name, "values": [0.0] * 576,
                                                      "layer": 1})
    assert_error(r.status_code, r.json(), 400, "name")
    r = admin_http.post("/v1/steering/probes", json={
        "name": name, "weights": {}, "thresholds": {"alpha": 0.1, "beta": 1.0, "gamma": 0.1}})
    assert_error(r.status_code, r.json(), 400, "name")
    assert sorted(p for p in server.log_path.parent.rglob("*")) == before
    assert artifacts.is_dir()
