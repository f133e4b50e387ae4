"""The project's error family: each error carries the HTTP status and OpenAI error type it
answers with, so library code raises and the HTTP layer (`server.errors`) only renders the
body. Messages name the request field at fault in `param` (a dotted JSON path)."""

from __future__ import annotations


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


class Forbidden(APIError):
    status, type = 403, "permission_error"


class NotFound(APIError):
    status, type = 404, "not_found_error"


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


ERRORS_BY_STATUS = {400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                    413: PayloadTooLarge, 429: EngineBusy, 502: UpstreamError,
                    503: EngineUnavailable}


def error_for_status(status: int, message: str, param: str | None = None) -> APIError:
    """An error answered with `status` (e.g. by vLLM's serving layer), as one of ours."""
    kind = ERRORS_BY_STATUS.get(status)
    if kind is not None:
        return kind(message, param)
    error = APIError(message, param)
    error.status = status
    return error
