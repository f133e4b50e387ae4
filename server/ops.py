"""The routes around generation: models, tokenization, health, load, version, metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeResponse, TokenizeResponse

from server.deps import StateDep, require_api_key
from server.errors import ERROR_RESPONSES
from server.requests import DetokenizeRequest, TokenizeRequest
from server.serving import raise_error
from steering.errors import EngineUnavailable

models = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)
tokens = APIRouter(dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
operations = APIRouter(responses=ERROR_RESPONSES)  # health, version, metrics: no key


@operations.get("/health")
async def health(state: StateDep):
    if not state.engine.healthy:
        raise EngineUnavailable("the engine is not running")
    return {"status": "ok"}


@operations.get("/ping")
@operations.post("/ping")  # one route per method: each gets its own OpenAPI operation id
async def ping(state: StateDep):
    """`vllm serve`'s liveness route: the same answer as /health."""
    return await health(state)


@operations.get("/load")
async def load(state: StateDep):
    """`vllm serve`'s load route: the generation requests in flight (vLLM counts them only
    with --enable-server-load-tracking; here always)."""
    return {"server_load": state.admission.requests}


@operations.get("/version")
async def version():
    from importlib.metadata import version as installed

    import vllm

    return {"version": vllm.__version__, "entropy_steer": installed("entropy-steer")}


@operations.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: StateDep):
    return Response(generate_latest(state.engine.prometheus_registry()),
                    media_type=CONTENT_TYPE_LATEST)


@models.get("/models")
async def list_models(state: StateDep):
    return {"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": state.created,
        "owned_by": "entropy-steer", "max_model_len": state.engine.max_model_len,
        "num_layers": state.engine.num_layers, "hidden_size": state.engine.vectors.hidden_size,
    }]}


@tokens.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request, state: StateDep):
    result = await state.serving.tokenization.create_tokenize(body, request)
    raise_error(result)
    return result


@tokens.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request, state: StateDep):
    result = await state.serving.tokenization.create_detokenize(body, request)
    raise_error(result)
    return result
