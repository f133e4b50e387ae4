"""FastAPI application: routers, error handlers, and the engine's lifetime."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from server import anthropic_messages, artifacts, openai_responses, ops, routes
from server.default_model import seed_artifacts
from server.deps import Admission, ServerState
from server.errors import error_response, install_error_handlers
from server.metrics import SteerMetrics
from server.playground import install_playground
from server.serving import FrontendOptions, OpenAIServing
from steering.engine.engine import Engine
from steering.errors import PayloadTooLarge
from steering.methods.base import Services
from steering.methods.registry import METHODS

MAX_BODY_BYTES = 8 << 20
# A difficulty probe's weights arrive as JSON numbers, about 22 bytes a float: the paper
# recipe's 512-wide MLP is 10 MB on an 896-wide model and about 47 MB on a 4,096-wide one.
BODY_BYTES_BY_PATH = {"/v1/steering/probes": 96 << 20}


class BodyLimit:
    """Refuses request bodies over `limit` bytes (or the path's own limit in `by_path`) with a
    413: by their Content-Length before reading, and chunked uploads (no length) as soon as the
    bytes read pass the limit, so an endless body is never buffered."""

    def __init__(self, app, limit: int, by_path: dict[str, int]) -> None:
        self.app, self.limit, self.by_path = app, limit, by_path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.by_path.get(scope["path"], self.limit)
        message = f"request bodies are limited to {limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = error_response(PayloadTooLarge(message))
            return await response(scope, receive, send)
        read = 0

        async def limited_receive():
            nonlocal read
            received = await receive()
            read += len(received.get("body", b""))
            if read > limit:  # an HTTPException, so FastAPI's body parsing passes it on
                raise HTTPException(413, message)
            return received

        await self.app(scope, limited_receive, send)


def create_app(engine: Engine | None, api_key: str | None = None, admin_key: str | None = None,
               method_configs: dict | None = None, frontend: FrontendOptions | None = None,
               strict_fields: bool = False, max_queued_requests: int | None = None,
               playground: bool = True, seed_from: Path | None = None) -> FastAPI:
    """An app that starts `engine` on start-up and shuts it down on exit. `method_configs`:
    each method's server configuration by name (`Method.configure`; unset: its defaults);
    `frontend`: the options of vLLM's OpenAI layer; `max_queued_requests` sequences may wait
    beyond the engine's batch (default: one more batch); `playground` serves the web page at
    `/`; `seed_from`: a folder of ready-made vectors and probes for the served model, installed
    at start (`seed_artifacts`)."""
    configs = method_configs or {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        if seed_from:
            seed_artifacts(engine.vectors, engine.probes, seed_from)
        metrics = SteerMetrics(engine.model_name)
        metrics.watch_engine(engine)
        services = Services(engine, metrics)
        started = []
        try:
            states = {}
            for method in METHODS:
                states[method.name] = await method.start(configs.get(method.name), services)
                started.append(method)
            serving = OpenAIServing(engine.client, engine.model_name, engine.model_path,
                                    frontend or FrontendOptions())
            queued = engine.max_num_seqs if max_queued_requests is None else max_queued_requests
            admission = Admission(engine.max_num_seqs + queued)
            metrics.watch_admission(admission)
            app.state.steer = ServerState(engine, metrics, states, serving, engine.model_name,
                                          api_key, admin_key, strict_fields, admission)
            yield
        finally:
            for method in reversed(started):
                method.stop(states[method.name])
            await engine.shutdown()

    app = FastAPI(title="entropy-steer", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible vLLM server with entropy-based steering")
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, by_path=BODY_BYTES_BY_PATH)
    app.include_router(routes.router)
    app.include_router(routes.sagemaker)
    app.include_router(openai_responses.router)
    app.include_router(anthropic_messages.router)
    app.include_router(ops.models)
    app.include_router(ops.tokens)
    app.include_router(artifacts.router)
    app.include_router(ops.operations)
    if playground:
        install_playground(app)
    return app
