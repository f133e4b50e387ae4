"""Keys on every route of the OpenAPI schema: the API key for /v1/* and /invocations (as
`Authorization: Bearer` or, as Anthropic's SDKs send it, `x-api-key`), the admin key for
artifact writes, /health, /ping, /load, /version and /metrics open to probes and scrapers;
listings never show server paths."""

import httpx
import pytest

from tests.conftest import ADMIN_KEY, API_KEY

OPEN = {"/health", "/ping", "/load", "/version", "/metrics"}  # the documented policy: probes and
# scrapers need no key
WRONG = [None, "Bearer", f"Basic {API_KEY}", f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}",
         f"Bearer {ADMIN_KEY[:-1]}", b"Bearer \xff\xfe"]  # Authorization headers


def operations(server) -> list[tuple[str, str]]:
    """(method, path) of every operation the server documents, path parameters filled in."""
    paths = httpx.get(f"{server.base_url}/openapi.json").json()["paths"]
    return [(method.upper(), path.replace("{name}", "no-such-artifact")
             .replace("{response_id}", "resp_no_such_response"))
            for path, item in paths.items() for method in item]


def call(server, method: str, path: str, key: str | None = None, **headers) -> httpx.Response:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, f"{server.base_url}{path}", headers=headers, timeout=60,
                         json={} if method == "POST" else None)


def test_every_v1_route_needs_the_api_key(server):
    ops = operations(server)
    assert {path for _, path in ops} >= OPEN | {"/v1/completions", "/v1/steering/vectors",
                                                "/v1/responses", "/v1/messages", "/invocations"}
    for method, path in ops:
        if path in OPEN:
            assert call(server, method, path).status_code == 200, path
            continue
        for header in WRONG:
            r = call(server, method, path, **({} if header is None else {"Authorization": header}))
            assert r.status_code == 401, (method, path, header, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        for key in (API_KEY, ADMIN_KEY):  # past the key check: whatever the route says next
            assert call(server, method, path, key).status_code != 401, (method, path)


def test_the_key_may_come_as_x_api_key(server):
    """Anthropic's SDKs send `x-api-key`: accepted on every route the API key opens, checked
    the same way."""
    for method, path in operations(server):
        if path in OPEN:
            continue
        wrong = call(server, method, path, **{"x-api-key": API_KEY + "x"})
        assert wrong.status_code == 401, (method, path)
        assert call(server, method, path, **{"x-api-key": API_KEY}).status_code != 401, path


def test_artifact_writes_need_the_admin_key(server):
    writes = [(m, p) for m, p in operations(server)
              if p.startswith("/v1/steering/") and m in ("POST", "DELETE")]
    assert len(writes) == 4
    for method, path in writes:
        r = call(server, method, path, API_KEY)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["error"]["type"] == "permission_error"
        # the admin key passes (then a 400 for the empty upload, a 404 for the unknown name)
        assert call(server, method, path, ADMIN_KEY).status_code in (400, 404)


@pytest.mark.parametrize("kind, detail", [("vectors", "include_values"),
                                          ("probes", "include_weights")])
def test_artifact_records_show_no_server_paths(server, http, kind, detail):
    folder = str(server.log_path.parent)
    listing = http.get(f"/v1/steering/{kind}")
    assert listing.status_code == 200 and listing.json()["data"]
    for record in listing.json()["data"]:
        full = http.get(f"/v1/steering/{kind}/{record['id']}", params={detail: True})
        for text in (str(record), full.text):
            assert folder not in text and ".safetensors" not in text
            assert "/tmp" not in text and "/root" not in text and "/home" not in text
