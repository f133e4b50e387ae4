"""The app without an engine: its OpenAPI document (client generators need one operation id
per operation) and its body limits."""

import warnings
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from server.app import BodyLimit, create_app
from server.errors import install_error_handlers


def test_every_operation_has_its_own_id():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns on a duplicate id and keeps both
        document = create_app(engine=None).openapi()
    ids = Counter(operation["operationId"] for path in document["paths"].values()
                  for operation in path.values())
    assert [name for name, count in ids.items() if count > 1] == []
    assert {"get", "post"} <= set(document["paths"]["/ping"])


def test_a_path_with_its_own_body_limit_takes_bodies_the_others_refuse():
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=100, by_path={"/big": 1000})

    @app.post("/big")
    @app.post("/small")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    client = TestClient(app)
    body = b"x" * 500
    assert client.post("/big", content=body).json() == {"bytes": 500}
    for path, sent in (("/small", body), ("/big", b"x" * 1001)):
        for content in (sent, iter([sent[:50], sent[50:]])):  # with a length, then chunked
            reply = client.post(path, content=content)
            assert reply.status_code == 413, (path, reply.text)
            limit = 1000 if path == "/big" else 100
            message = f"request bodies are limited to {limit} bytes"
            assert reply.json()["error"]["message"] == message
