"""The client's implementation (see `clients.sdk`): request bodies, answers, streamed events,
errors, for both `Client` and `AsyncClient`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field

import httpx


class SteerError(RuntimeError):
    """An error answer from the server (OpenAI error body)."""

    def __init__(self, status: int, message: str, type_: str | None = None,
                 param: str | None = None, code=None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)


@dataclass(frozen=True)
class Result:
    """One choice of a finished request."""

    text: str
    finish_reason: str | None
    steering: dict
    usage: dict
    raw: dict = field(repr=False)

    @property
    def entropy(self) -> list[float | None]:
        """Per-token entropy (needs `return_entropy`)."""
        return self.steering.get("token_entropy", [])


@dataclass(frozen=True)
class StreamEvent:
    """One streamed chunk of choice 0: new text and its tokens' entropy, or (particle filtering)
    a progress report; the last one carries the finish reason and the whole steering report."""

    text: str = ""
    entropy: list[float | None] = field(default_factory=list)
    varentropy: list[float | None] = field(default_factory=list)
    finish_reason: str | None = None
    steering: dict | None = None
    progress: dict | None = None


def request_body(kind: str, payload, steering: Mapping | None, params: dict) -> dict:
    """The JSON body of a `kind` ("chat" or "complete") request: the messages or prompt, the
    OpenAI fields in `params` and the `steering` object as given (the server checks it and
    names a misspelt field in its 400)."""
    body = {("messages" if kind == "chat" else "prompt"): payload, **params}
    if steering is not None:
        body["steering"] = dict(steering)
    return body


def bearer_headers(api_key: str | None, admin_key: str | None, admin: bool = False) -> dict:
    """Bearer headers: the API key, or for writes the admin key (falling back to the API key)."""
    key = (admin_key or api_key) if admin else api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


def checked(response: httpx.Response) -> dict:
    """The JSON body of a successful answer; otherwise `SteerError` with the server's message
    and the field it names."""
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise SteerError(response.status_code, response.text) from None
        raise SteerError(response.status_code, error.get("message", ""), error.get("type"),
                         error.get("param"), error.get("code"))
    return response.json()


def _result(kind: str, reply: dict) -> Result:
    choice = reply["choices"][0]
    text = choice["message"]["content"] if kind == "chat" else choice["text"]
    return Result(text=text, finish_reason=choice["finish_reason"],
                  steering=choice.get("steering", {}), usage=reply.get("usage", {}), raw=reply)


def _event(kind: str, line: str) -> StreamEvent | None:
    """Parse one server-sent-events line; None for anything but a chunk of choice 0."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    chunk = json.loads(line[6:])
    if "error" in chunk:
        error = chunk["error"]
        raise SteerError(int(error.get("code") or 500), error.get("message", ""),
                         error.get("type"), error.get("param"))
    if not chunk["choices"]:  # a multi-pass method's progress: {"steering": {method: {...}}}
        progress = next((section["progress"] for section in (chunk.get("steering") or {}).values()
                         if isinstance(section, dict) and "progress" in section), None)
        return StreamEvent(progress=progress) if progress else None
    choice = chunk["choices"][0]
    if choice["index"] != 0:
        return None
    text = (choice.get("delta") or {}).get("content") or "" if kind == "chat" else choice["text"]
    steering = choice.get("steering") or {}
    return StreamEvent(text=text, entropy=steering.get("chunk_entropy", []),
                       varentropy=steering.get("chunk_varentropy", []),
                       finish_reason=choice.get("finish_reason"),
                       steering=steering if choice.get("finish_reason") else None)


_ROUTES = {"chat": "/v1/chat/completions", "complete": "/v1/completions"}
_DATA_FLAG = {"vectors": "include_values", "probes": "include_weights"}


@dataclass(frozen=True)
class _Call:
    """One HTTP call and how to read its answer: what both clients share."""

    method: str
    path: str
    json: dict | None = None
    params: dict | None = None
    admin: bool = False
    read: object = None  # dict -> value; None: the JSON body


class _Calls:
    """Every non-streaming call of the API, transport-free."""

    @staticmethod
    def generate(kind: str, payload, steering, params: dict) -> _Call:
        return _Call("POST", _ROUTES[kind], request_body(kind, payload, steering, params),
                     read=lambda reply: _result(kind, reply))

    models = _Call("GET", "/v1/models", read=lambda reply: reply["data"])

    @staticmethod
    def list_artifacts(kind: str) -> _Call:
        """`kind`: 'vectors' or 'probes'."""
        return _Call("GET", f"/v1/steering/{kind}", read=lambda reply: reply["data"])

    @staticmethod
    def get_artifact(kind: str, name: str, include_data: bool) -> _Call:
        return _Call("GET", f"/v1/steering/{kind}/{name}",
                     params={_DATA_FLAG[kind]: include_data})

    @staticmethod
    def upload_vector(name: str, values, layer: int, description: str) -> _Call:
        return _Call("POST", "/v1/steering/vectors", {
            "name": name, "values": [float(v) for v in values], "layer": layer,
            "description": description}, admin=True)

    @staticmethod
    def upload_probe(body: dict) -> _Call:
        return _Call("POST", "/v1/steering/probes", body, admin=True)

    @staticmethod
    def delete_artifact(kind: str, name: str) -> _Call:
        return _Call("DELETE", f"/v1/steering/{kind}/{name}", admin=True)


class _Keys:
    def __init__(self, api_key: str | None, admin_key: str | None) -> None:
        self.read = bearer_headers(api_key, admin_key)
        self.write = bearer_headers(api_key, admin_key, admin=True)

    def headers(self, call: _Call) -> dict:
        return self.write if call.admin else self.read


def _finish(call: _Call, response: httpx.Response):
    reply = checked(response)
    return call.read(reply) if call.read else reply


class Client:
    """Blocking client. `api_key` for inference and reads; `admin_key` for artifact writes
    (falls back to `api_key`). Artifact methods take kind 'vectors' or 'probes'."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 admin_key: str | None = None, timeout: float = 600.0) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self._keys = _Keys(api_key, admin_key)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self._http.close()

    def _run(self, call: _Call):
        return _finish(call, self._http.request(call.method, call.path, json=call.json,
                                                params=call.params,
                                                headers=self._keys.headers(call)))

    def chat(self, messages: list[dict], *, steering=None, **params) -> Result:
        return self._run(_Calls.generate("chat", messages, steering, params))

    def complete(self, prompt, *, steering=None, **params) -> Result:
        return self._run(_Calls.generate("complete", prompt, steering, params))

    def stream_chat(self, messages, *, steering=None, **params) -> Iterator[StreamEvent]:
        return self._stream(_Calls.generate("chat", messages, steering, params), "chat")

    def stream_complete(self, prompt, *, steering=None, **params) -> Iterator[StreamEvent]:
        return self._stream(_Calls.generate("complete", prompt, steering, params), "complete")

    def _stream(self, call: _Call, kind: str) -> Iterator[StreamEvent]:
        with self._http.stream("POST", call.path, json={**call.json, "stream": True},
                               headers=self._keys.headers(call)) as response:
            if response.status_code >= 400:
                response.read()
                checked(response)
            for line in response.iter_lines():
                if (event := _event(kind, line)) is not None:
                    yield event

    def models(self) -> list[dict]:
        return self._run(_Calls.models)

    def list_artifacts(self, kind: str) -> list[dict]:
        return self._run(_Calls.list_artifacts(kind))

    def get_artifact(self, kind: str, name: str, include_data: bool = False) -> dict:
        return self._run(_Calls.get_artifact(kind, name, include_data))

    def upload_vector(self, name: str, values, layer: int, description: str = "") -> dict:
        return self._run(_Calls.upload_vector(name, values, layer, description))

    def upload_probe(self, body: dict) -> dict:
        """`body` as `POST /v1/steering/probes` takes it (docs/diffadapt.md)."""
        return self._run(_Calls.upload_probe(body))

    def delete_artifact(self, kind: str, name: str) -> dict:
        return self._run(_Calls.delete_artifact(kind, name))


class AsyncClient:
    """`Client`'s API for asyncio (methods are coroutines; streams are async iterators)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 admin_key: str | None = None, timeout: float = 600.0) -> None:
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)
        self._keys = _Keys(api_key, admin_key)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()

    async def _run(self, call: _Call):
        return _finish(call, await self._http.request(call.method, call.path, json=call.json,
                                                      params=call.params,
                                                      headers=self._keys.headers(call)))

    async def chat(self, messages: list[dict], *, steering=None, **params) -> Result:
        return await self._run(_Calls.generate("chat", messages, steering, params))

    async def complete(self, prompt, *, steering=None, **params) -> Result:
        return await self._run(_Calls.generate("complete", prompt, steering, params))

    def stream_chat(self, messages, *, steering=None, **params) -> AsyncIterator[StreamEvent]:
        return self._stream(_Calls.generate("chat", messages, steering, params), "chat")

    def stream_complete(self, prompt, *, steering=None,
                        **params) -> AsyncIterator[StreamEvent]:
        return self._stream(_Calls.generate("complete", prompt, steering, params), "complete")

    async def _stream(self, call: _Call, kind: str) -> AsyncIterator[StreamEvent]:
        async with self._http.stream("POST", call.path, json={**call.json, "stream": True},
                                     headers=self._keys.headers(call)) as response:
            if response.status_code >= 400:
                await response.aread()
                checked(response)
            async for line in response.aiter_lines():
                if (event := _event(kind, line)) is not None:
                    yield event

    async def models(self) -> list[dict]:
        return await self._run(_Calls.models)

    async def list_artifacts(self, kind: str) -> list[dict]:
        return await self._run(_Calls.list_artifacts(kind))

    async def get_artifact(self, kind: str, name: str, include_data: bool = False) -> dict:
        return await self._run(_Calls.get_artifact(kind, name, include_data))

    async def upload_vector(self, name: str, values, layer: int, description: str = "") -> dict:
        return await self._run(_Calls.upload_vector(name, values, layer, description))

    async def upload_probe(self, body: dict) -> dict:
        return await self._run(_Calls.upload_probe(body))

    async def delete_artifact(self, kind: str, name: str) -> dict:
        return await self._run(_Calls.delete_artifact(kind, name))
