"""FastAPI application: routers, error handlers, and the engine's lifetime."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.engine import Engine
from server.errors import install_error_handlers
from server.metrics import SteerMetrics
from server.routes import ServerState, ops, v1


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               metrics: SteerMetrics | None = None) -> FastAPI:
    """An app that starts `engine` on start-up and shuts it down on exit."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        app.state.steer = ServerState(engine, metrics or SteerMetrics(), model_name, api_key)
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="entropy-steer", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible vLLM server with entropy-based steering")
    install_error_handlers(app)
    app.include_router(v1)
    app.include_router(ops)
    return app
