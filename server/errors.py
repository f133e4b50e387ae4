"""The error family (`steering.errors`) rendered in the OpenAI error body:
{"error": {"message", "type", "param", "code"}} (or, on the Anthropic Messages routes,
Anthropic's: {"type": "error", "error": {"type", "message"}}), and the app's handlers for it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from steering.errors import (
    ERRORS_BY_STATUS,
    APIError,
    EngineUnavailable,
    InvalidRequest,
    error_for_status,
)

logger = logging.getLogger("entropy_steer.errors")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorBody(BaseModel):
    """The OpenAI error body, as documented in the OpenAPI schema for every error status."""

    error: ErrorDetail


ERROR_RESPONSES = {
    "4XX": {"model": ErrorBody, "description": "bad input, key, name or size"},
    "5XX": {"model": ErrorBody, "description": "engine down, upstream failure, server fault"},
}


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    """Anthropic's error body."""

    type: str = "error"
    error: AnthropicErrorDetail


ANTHROPIC_ERROR_RESPONSES = {
    "4XX": {"model": AnthropicErrorBody, "description": "bad input, key, name or size"},
    "5XX": {"model": AnthropicErrorBody, "description": "engine down, server fault"},
}

# Anthropic's error type for each status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}
ANTHROPIC_PATH = "/v1/messages"


def anthropic_error_body(exc: APIError) -> dict:
    message = f"{exc.param}: {exc.message}" if exc.param and exc.param not in exc.message \
        else exc.message
    return {"type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(exc.status, "api_error"), "message": message}}


def error_body(status: int, type_: str, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def in_band_error(exc: Exception) -> dict:
    """An error after a stream's status line went out, as OpenAI sends it: the error body in
    an event, with the status as its `code`."""
    status = getattr(exc, "status", 500)
    return error_body(status, getattr(exc, "type", "server_error"),
                      getattr(exc, "message", "internal error"), getattr(exc, "param", None),
                      status)


def error_response(exc: APIError, path: str = "") -> JSONResponse:
    """`exc` in the error body of the API family `path` belongs to."""
    if path.startswith(ANTHROPIC_PATH):
        body = anthropic_error_body(exc)
    else:
        body = error_body(exc.status, exc.type, exc.message, exc.param, exc.code)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "json-or-python"}


def _validation_param(loc: tuple) -> str | None:
    """Dotted field path of a pydantic error, without union branch names."""
    # pydantic names union branches ('constrained-str', 'list[int]', 'EastOptions'); our field
    # names are snake_case, so a part with '[', '-' or a capital is a branch name.
    parts = [str(p) for p in loc
             if not (isinstance(p, str) and ("[" in p or "-" in p or p[:1].isupper()
                                             or p in _TYPE_NAMES))]
    return ".".join(parts) or None


def validation_error(errors: list[dict]) -> InvalidRequest:
    """A 400 from pydantic's errors (locations relative to the body): the first error's field
    and message, and the other fields that failed."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"malformed JSON body: {first['msg']}")
    param = _validation_param(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    others = {_validation_param(tuple(e.get("loc", ()))) for e in errors[1:]} - {param}
    if others:
        message += f" (also: {', '.join(sorted(str(o) for o in others))})"
    return InvalidRequest(message, param=param)


def _unparsable_body(exc: StarletteHTTPException) -> str | None:
    """What was wrong with a body FastAPI could not parse (it says only that it could not)."""
    if isinstance(exc.__cause__, UnicodeDecodeError):
        return f"the body is not valid UTF-8: {exc.__cause__}"
    if isinstance(exc.__cause__, RecursionError):
        return "the JSON body is nested too deeply"
    return None


# What a body FastAPI could not parse is, as the error a client gets (Starlette raises these
# statuses itself: a body it cannot read, an unknown route, a body over the limit).
_STARLETTE_STATUSES = (400, 401, 403, 404, 413)


def install_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI error body: ours, FastAPI's validation errors, Starlette's, and
    vLLM's exceptions raised inside its serving layer (e.g. by `SamplingParams`' validation),
    with the status `vllm serve` gives them."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMError
    from vllm.v1.engine.exceptions import EngineDeadError

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        # FastAPI roots each location at the request part ('body', 'query')
        return error_response(validation_error(
            [{**e, "loc": tuple(e.get("loc", ()))[1:]} for e in exc.errors()]),
            request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error", exc_info=exc)
        return error_response(APIError("internal server error; the server logged the details"),
                              request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code in _STARLETTE_STATUSES:
            cls = ERRORS_BY_STATUS[exc.status_code]
            return error_response(cls(_unparsable_body(exc) or str(exc.detail)),
                                  request.url.path)
        error = APIError(str(exc.detail))
        error.status, error.type = exc.status_code, "invalid_request_error"
        return error_response(error, request.url.path)

    async def _vllm_error(request: Request, exc: Exception):
        path = request.url.path
        if isinstance(getattr(exc, "error", None), APIError):  # ours, through vLLM's layer
            return error_response(exc.error, path)
        if isinstance(exc, EngineDeadError):
            return error_response(EngineUnavailable("the engine process died"), path)
        error = create_error_response(exc).error
        return error_response(error_for_status(error.code, error.message, error.param), path)

    for kind in (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError):
        app.add_exception_handler(kind, _vllm_error)
