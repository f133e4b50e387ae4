"""FastAPI application: routers, error handlers, and the engine's lifetime."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from server.artifact_routes import router as artifact_router
from server.deps import Admission, ServerState
from server.diffadapt import DEFAULT_MAX_TOKENS, DifficultyRouter
from server.engine import Engine
from server.errors import PayloadTooLarge, error_response, install_error_handlers
from server.metrics import SteerMetrics
from server.openai_serving import FrontendOptions, OpenAIServing
from server.openai_serving import install_error_handlers as install_vllm_error_handlers
from server.particles import ParticleConfig
from server.playground import install_playground
from server.routes import ops, tokens, v1
from steering.diffadapt import RECIPES, Recipe, Strategy

MAX_BODY_BYTES = 8 << 20


class BodyLimit:
    """Refuses request bodies over `limit` bytes with a 413: by their Content-Length before
    reading, and chunked uploads (no length) as soon as the bytes read pass the limit, so an
    endless body is never buffered."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    def _message(self) -> str:
        return f"request bodies are limited to {self.limit} bytes"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = error_response(PayloadTooLarge(self._message()))
            return await response(scope, receive, send)
        read = 0

        async def limited_receive():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.limit:  # an HTTPException, so FastAPI's body parsing passes it on
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)


def create_app(engine: Engine, api_key: str | None = None, admin_key: str | None = None,
               strategies: dict[str, Strategy] | None = None,
               diffadapt_max_tokens: int = DEFAULT_MAX_TOKENS,
               particles: ParticleConfig | None = None,
               frontend: FrontendOptions | None = None, strict_fields: bool = False,
               max_queued_requests: int | None = None, playground: bool = True) -> FastAPI:
    """An app that starts `engine` on start-up and shuts it down on exit; `strategies` are
    the DiffAdapt variant recipe's (default: its own), `frontend` the options of vLLM's OpenAI
    layer;
    `max_queued_requests` sequences may wait beyond the engine's batch (default: one more
    batch); `playground` serves the web page at `/`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        prm = particles.prm if particles else None
        if prm is not None:
            await prm.start()
        metrics = SteerMetrics()
        metrics.watch_engine(engine)
        router = DifficultyRouter(
            engine, metrics, strategies or dict(RECIPES[Recipe.VARIANT].strategies),
            diffadapt_max_tokens)
        serving = OpenAIServing(engine.client, engine.model_name, engine.model_path,
                                frontend or FrontendOptions())
        queued = engine.max_num_seqs if max_queued_requests is None else max_queued_requests
        admission = Admission(engine.max_num_seqs + queued)
        metrics.watch_admission(engine.model_name, admission)
        app.state.steer = ServerState(engine, metrics, router, particles or ParticleConfig(),
                                      serving, engine.model_name, api_key, admin_key,
                                      strict_fields, admission)
        try:
            yield
        finally:
            if prm is not None:
                prm.shutdown()
            await engine.shutdown()

    app = FastAPI(title="entropy-steer", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible vLLM server with entropy-based steering")
    install_error_handlers(app)
    install_vllm_error_handlers(app)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.include_router(v1)
    app.include_router(tokens)
    app.include_router(artifact_router)
    app.include_router(ops)
    if playground:
        install_playground(app)
    return app
