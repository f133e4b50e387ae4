"""The SDK's request bodies against the server's own `/openapi.json` (built without an engine):
the SDK keeps no copy of the server's models, so this is what keeps the two in step."""

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from clients.sdk import request_body
from server.app import create_app

URI = "urn:steer-openapi"


@pytest.fixture(scope="module")
def document() -> dict:
    return create_app(engine=None).openapi()


def request_validator(document: dict, route: str) -> Draft202012Validator:
    schema = document["paths"][route]["post"]["requestBody"]["content"]["application/json"]
    registry = Registry().with_resource(URI, Resource(document, DRAFT202012))
    ref = schema["schema"]["$ref"].replace("#", f"{URI}#", 1)
    return Draft202012Validator({"$ref": ref}, registry=registry)


@pytest.mark.parametrize("kind,route,payload", [
    ("chat", "/v1/chat/completions", [{"role": "user", "content": "hi"}]),
    ("complete", "/v1/completions", "Once upon a time"),
])
def test_the_sdks_bodies_are_what_the_server_documents(document, kind, route, payload):
    validator = request_validator(document, route)
    steering = {"typical": {"p": 0.9}, "east": {"vector": "explore", "scale": 4.0},
                "gates": [{"signal": "entropy", "above": 3.0, "then": {"temperature": 0.3}}],
                "return_entropy": True}
    body = request_body(kind, payload, steering, {"max_tokens": 8, "seed": 1})
    assert list(validator.iter_errors(body)) == []
    misspelt = request_body(kind, payload, {"typicall": {"p": 0.9}}, {})
    assert [e.message for e in validator.iter_errors(misspelt)]  # the check can fail
