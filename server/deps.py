"""What routes depend on: the server's state, the key checks and admission, as `Annotated`
aliases."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from server.metrics import SteerMetrics
from steering.engine.engine import Engine
from steering.errors import EngineBusy, Forbidden, Unauthorized


class Admission:
    """A bound on the engine sequences the server holds, running and waiting: past `limit` a
    generation request is a 429 at once (with `Retry-After`) instead of a queue that grows
    until clients time out. A request holds as many sequences as it makes (choices × prompts,
    or what a method that answers it itself runs at once) until its answer has been sent."""

    RETRY_AFTER_S = 1

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self.requests = 0  # generation requests in flight (`/load`)

    def take(self, sequences: int) -> int:
        """Hold `sequences` (one request may always run alone, however many it makes)."""
        if self.held and self.held + sequences > self.limit:
            raise EngineBusy(f"the server holds {self.held} sequences of its {self.limit} "
                             f"(--max-queued-requests); retry shortly",
                             retry_after=self.RETRY_AFTER_S)
        self.held += sequences
        return sequences

    def give_back(self, sequences: int) -> None:
        self.held -= sequences


class ServerState:
    """What the routes need, stored on `app.state.steer`; `method_states`: what each method
    keeps while the server runs (`Method.start`), by method name."""

    def __init__(self, engine: Engine, metrics: SteerMetrics, method_states: dict, serving,
                 model_name: str, api_key: str | None, admin_key: str | None = None,
                 strict_fields: bool = False, admission: Admission | None = None) -> None:
        self.engine, self.metrics, self.model_name = engine, metrics, model_name
        self.method_states, self.serving = method_states, serving
        self.api_key, self.admin_key = api_key, admin_key
        self.strict_fields = strict_fields
        self.admission = admission or Admission(limit=2**31)
        self.created = int(time.time())


def get_state(request: Request) -> ServerState:
    return request.app.state.steer


StateDep = Annotated[ServerState, Depends(get_state)]


class Hold:
    """A request's admission: `take` once it knows its size; `give_back` once the engine has
    produced the whole answer, before it is sent, so that a client sending its next request on
    receipt never finds its last one still held."""

    def __init__(self, admission: Admission) -> None:
        self.admission, self.sequences = admission, 0

    def take(self, sequences: int) -> None:
        self.sequences += self.admission.take(sequences)

    def give_back(self) -> None:
        self.admission.give_back(self.sequences)
        self.sequences = 0


async def _hold(state: StateDep) -> AsyncIterator[Hold]:
    hold = Hold(state.admission)
    state.admission.requests += 1
    try:
        yield hold
    finally:  # after the response (an error, a client gone): whatever is still held
        hold.give_back()
        state.admission.requests -= 1


HoldDep = Annotated[Hold, Depends(_hold)]


def bearer_token(request: Request) -> str:
    """The key a client sent: `Authorization: Bearer KEY`, or `x-api-key: KEY` (how
    Anthropic's SDKs send theirs)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    return request.headers.get("x-api-key", "").strip()


def require_api_key(request: Request, state: StateDep) -> None:
    """Bearer token check, in constant time; the admin key is accepted too."""
    if state.api_key is None:
        return
    token = bearer_token(request).encode()
    valid = hmac.compare_digest(token, state.api_key.encode())
    if state.admin_key is not None:
        valid |= hmac.compare_digest(token, state.admin_key.encode())
    if not valid:
        raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer KEY' or "
                           "'x-api-key: KEY')")


def require_admin_key(request: Request, state: StateDep) -> None:
    if state.admin_key is None:
        return
    if not hmac.compare_digest(bearer_token(request).encode(), state.admin_key.encode()):
        raise Forbidden("writing steering artifacts needs the admin key "
                        "('Authorization: Bearer ADMIN_KEY')")

