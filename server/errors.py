"""Errors in the OpenAI error body: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("entropy_steer.errors")


class APIError(Exception):
    """An error with its HTTP status and OpenAI error type."""

    status = 500
    type = "server_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class InvalidRequest(APIError):
    status, type = 400, "invalid_request_error"


class Unauthorized(APIError):
    status, type = 401, "authentication_error"
    headers = {"WWW-Authenticate": "Bearer"}


class NotFound(APIError):
    status, type = 404, "not_found_error"


class Forbidden(APIError):
    status, type = 403, "permission_error"


class PayloadTooLarge(APIError):
    status, type = 413, "invalid_request_error"


class ClientClosed(APIError):
    """The client went away before the response (nginx's 499); no one reads this body."""

    status, type = 499, "client_closed_request"


class EngineBusy(APIError):
    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message, param, code)
        if retry_after is not None:
            self.headers = {"Retry-After": str(retry_after)}


class UpstreamError(APIError):
    """A service the server depends on (e.g. a reward scorer) failed or answered badly."""

    status, type = 502, "upstream_error"


class EngineUnavailable(APIError):
    status, type = 503, "service_unavailable"


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


def error_body(status: int, type_: str, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def in_band_error(exc: Exception) -> dict:
    """An error after a stream's status line went out, as OpenAI sends it: the error body in
    an event, with the status as its `code`."""
    status = getattr(exc, "status", 500)
    return error_body(status, getattr(exc, "type", "server_error"),
                      getattr(exc, "message", "internal error"), getattr(exc, "param", None),
                      status)


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.status, exc.type, exc.message, exc.param, exc.code),
        status_code=exc.status,
        headers=exc.headers,
    )


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        # FastAPI roots each location at the request part ('body', 'query')
        return error_response(validation_error(
            [{**e, "loc": tuple(e.get("loc", ()))[1:]} for e in exc.errors()]))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("unhandled error", exc_info=exc)
        return error_response(APIError("internal server error; the server logged the details"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kinds = {400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                 413: PayloadTooLarge}
        cls = kinds.get(exc.status_code)
        if cls is not None:
            return error_response(cls(_unparsable_body(exc) or str(exc.detail)))
        return JSONResponse(
            error_body(exc.status_code, "invalid_request_error", str(exc.detail)),
            status_code=exc.status_code,
        )
