"""Validate server answers against OpenAI's published response schemas.

`tests/data/openai_schemas.json` is a vendored subset of OpenAI's OpenAPI 3.1 spec: repository
openai/openai-openapi, file `openapi.json` (identical for these schemas to `openapi.yaml`), commit
f85dbe223d40e1a31cba812ab2d755c7e98a92a3. It holds, under `components.schemas` and under their
names in the spec, the answers of `POST /chat/completions` (JSON and stream chunk:
`CreateChatCompletionResponse`, `CreateChatCompletionStreamResponse`), `POST /completions` (whose
stream chunks share `CreateCompletionResponse`) and the Responses API (`Response`, the answer of
`POST /responses` and `GET /responses/{response_id}`; `ResponseStreamEvent`, the union of every
event `POST /responses` streams), with every schema they `$ref`, transitively (all `$ref`s are
`#/components/schemas/<name>`, so the closure follows them from these five roots). Each schema
was then rewritten recursively: every key starting with `x-` dropped, and every `nullable: true`
removed with its schema turned into `{<annotations>, "anyOf": [<the rest>, {"type": "null"}]}`,
where the annotations (`title`, `description`, `default`, `example`, `examples`, `deprecated`)
stay outside in their order; nothing else was changed (so `discriminator` stays, and is ignored
by JSON Schema, as is the 2019-09 `$recursiveRef` of `CompoundFilter`, whose recursive branch
thus accepts anything). Schemas are sorted by name, keys otherwise in the spec's order; written
as JSON with an indent of 1, non-ASCII kept, and a final newline, after a `source` object naming
the repository, path, commit and retrieval date. A Draft 2020-12 validator thus reads it as
OpenAPI does.

    from tests.openai_spec import CHAT_RESPONSE, validate
    validate(CHAT_RESPONSE, response.json())  # AssertionError listing every violation
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SCHEMAS_PATH = Path(__file__).parent / "data" / "openai_schemas.json"
_URI = "urn:openai-openapi"

CHAT_RESPONSE = "CreateChatCompletionResponse"
CHAT_CHUNK = "CreateChatCompletionStreamResponse"
COMPLETION_RESPONSE = "CreateCompletionResponse"  # also each chunk of a streamed completion
RESPONSE = "Response"  # POST /responses, GET /responses/{response_id}
RESPONSE_STREAM_EVENT = "ResponseStreamEvent"  # each `data:` event of a streamed POST /responses
_MAX_MESSAGE = 300


@lru_cache(maxsize=1)
def _document() -> dict:
    return json.loads(SCHEMAS_PATH.read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _validator(schema_name: str) -> Draft202012Validator:
    document = _document()
    if schema_name not in document["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in {SCHEMAS_PATH.name}")
    registry = Registry().with_resource(_URI, DRAFT202012.create_resource(document))
    schema = {"$ref": f"{_URI}#/components/schemas/{schema_name}"}
    return Draft202012Validator(schema, registry=registry)


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _describe(error, indent: str = "") -> list[str]:
    lines = [f"{indent}{error.json_path}: {_short(error.message)}"]
    for sub in error.context or ():  # why each branch of an anyOf / oneOf failed
        lines.extend(_describe(sub, indent + "    "))
    return lines


def validate(schema_name: str, payload: dict) -> None:
    """Raise AssertionError listing every way `payload` breaks `#/components/schemas/<name>`."""
    errors = sorted(_validator(schema_name).iter_errors(payload), key=lambda e: e.json_path)
    if errors:
        lines = [f"{len(errors)} violation(s) of OpenAI schema {schema_name}:"]
        for error in errors:
            lines.extend(_describe(error, "  "))
        raise AssertionError("\n".join(lines))
