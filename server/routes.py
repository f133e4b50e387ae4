"""OpenAI-compatible routes: models, completions, chat completions, health, metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.diffadapt import DifficultyRouter, reject_conflicts
from server.engine import Engine, TokenLogprob
from server.errors import (
    ERROR_RESPONSES,
    ClientClosed,
    EngineUnavailable,
    InvalidRequest,
    NotFound,
    Unauthorized,
)
from server.generation import (
    ChoiceResult,
    Generation,
    Plan,
    sampling_options,
    steering_report,
)
from server.metrics import SteerMetrics
from server.particles import ParticleConfig, ParticleResult, ParticleRun
from server.particles import reject_conflicts as reject_particle_conflicts
from server.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest


class ServerState:
    """What the routes need, stored on `app.state.steer`."""

    def __init__(self, engine: Engine, metrics: SteerMetrics, router: DifficultyRouter,
                 particles: ParticleConfig, model_name: str, api_key: str | None,
                 admin_key: str | None = None) -> None:
        self.engine, self.metrics, self.model_name = engine, metrics, model_name
        self.router, self.particles = router, particles
        self.api_key, self.admin_key = api_key, admin_key
        self.created = int(time.time())


def get_state(request: Request) -> ServerState:
    return request.app.state.steer


def bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def require_api_key(request: Request, state: ServerState = Depends(get_state)) -> None:
    """Bearer token check for /v1/*, in constant time; the admin key is accepted too."""
    if state.api_key is None:
        return
    token = bearer_token(request).encode()
    valid = hmac.compare_digest(token, state.api_key.encode())
    if state.admin_key is not None:
        valid |= hmac.compare_digest(token, state.admin_key.encode())
    if not valid:
        raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer KEY')")


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
ops = APIRouter(responses=ERROR_RESPONSES)


@ops.get("/health")
async def health(state: ServerState = Depends(get_state)):
    if not state.engine.healthy:
        raise EngineUnavailable("the engine is not running")
    return {"status": "ok"}


@ops.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: ServerState = Depends(get_state)):
    return Response(generate_latest(state.engine.prometheus_registry()),
                    media_type=CONTENT_TYPE_LATEST)


@v1.get("/models")
async def list_models(state: ServerState = Depends(get_state)):
    return {"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": state.created,
        "owned_by": "entropy-steer", "max_model_len": state.engine.max_model_len,
        "num_layers": state.engine.num_layers, "hidden_size": state.engine.vectors.hidden_size,
    }]}


def _check_model(state: ServerState, request: GenerationRequest) -> None:
    if request.model is not None and request.model != state.model_name:
        raise NotFound(f"model '{request.model}' is not served here; this server serves "
                       f"'{state.model_name}'", param="model", code="model_not_found")


STREAMABLE = {200: {"content": {"text/event-stream": {}}, "description": "a JSON body, or "
                   "server-sent events with `stream: true`"}}


@v1.post("/completions", responses=STREAMABLE)
async def completions(body: CompletionRequest, request: Request,
                      state: ServerState = Depends(get_state)):
    _check_model(state, body)
    plan = Plan.of(body)
    engine = state.engine
    if plan.particles:
        prompts = body.prompts()
        if len(prompts) != 1:
            raise InvalidRequest("steering.particles takes one prompt", "prompt")
        prompt = prompts[0] if isinstance(prompts[0], list) else engine.encode(prompts[0])
        return await _particles(state, body, plan, prompt, body.max_tokens, request,
                                "text_completion")
    if plan.diffadapt:
        reject_conflicts(body)
        if not all(isinstance(p, str) for p in body.prompts()):
            raise InvalidRequest("steering.diffadapt wraps the question in a strategy prompt: "
                                 "send the prompt as text", "prompt")
        limit = body.max_tokens if "max_tokens" in body.model_fields_set else None
        routed = await state.router.route(plan.diffadapt, body.prompts(), engine.encode, limit)
    else:
        routed = [(p if isinstance(p, list) else engine.encode(p), None) for p in body.prompts()]
    jobs, decisions = _fan_out(body, plan, routed, body.max_tokens, body.logprobs)
    generation = Generation(engine, state.metrics, state.model_name, plan, jobs,
                            stream_entropy=body.stream and plan.return_entropy,
                            decisions=decisions)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def envelope(choices: list[dict]) -> dict:
        return {"id": rid, "object": "text_completion", "created": created,
                "model": state.model_name, "choices": choices}

    if body.stream:
        async def chunks() -> AsyncIterator[dict]:
            async for index, delta in generation.deltas():
                choice = {"index": index, "text": delta.text,
                          "logprobs": _completion_logprobs(delta.logprobs, 0),
                          "finish_reason": delta.finish_reason}
                _annotate_chunk(choice, body, generation, index, delta)
                yield envelope([choice])
            if body.stream_options and body.stream_options.include_usage:
                yield {**envelope([]), "usage": generation.usage()}
        return _sse(chunks())

    results = await _cancel_on_disconnect(request, generation.run_to_end())
    return {**envelope([{
        "index": r.index, "text": r.text,
        "logprobs": _completion_logprobs(r.logprobs, 0) if body.logprobs is not None else None,
        "finish_reason": r.finish_reason, "steering": generation.report(r.index),
        **_token_ids(body, generation, r),
    } for r in results]), "usage": generation.usage()}


@v1.post("/chat/completions", responses=STREAMABLE)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           state: ServerState = Depends(get_state)):
    _check_model(state, body)
    plan = Plan.of(body)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if plan.particles:
        return await _particles(state, body, plan, state.engine.encode_chat(messages),
                                body.token_limit, request, "chat.completion")
    if plan.diffadapt:
        reject_conflicts(body)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise InvalidRequest("steering.diffadapt needs a user message (the question)",
                                 "messages")

        def render(question: str) -> list[int]:
            wrapped = [*messages]
            wrapped[last_user] = {**messages[last_user], "content": question}
            return state.engine.encode_chat(wrapped)

        routed = await state.router.route(plan.diffadapt, [messages[last_user]["content"]],
                                          render, body.token_limit)
    else:
        routed = [(state.engine.encode_chat(messages), None)]
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    jobs, decisions = _fan_out(body, plan, routed, body.token_limit, logprobs)
    generation = Generation(state.engine, state.metrics, state.model_name, plan, jobs,
                            stream_entropy=body.stream and plan.return_entropy,
                            decisions=decisions)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def envelope(obj: str, choices: list[dict]) -> dict:
        return {"id": rid, "object": obj, "created": created, "model": state.model_name,
                "choices": choices}

    if body.stream:
        async def chunks() -> AsyncIterator[dict]:
            for j in range(body.n):
                yield envelope("chat.completion.chunk", [{
                    "index": j, "delta": {"role": "assistant", "content": ""},
                    "logprobs": None, "finish_reason": None}])
            async for index, delta in generation.deltas():
                choice = {"index": index, "delta": {"content": delta.text},
                          "logprobs": _chat_logprobs(delta.logprobs) if body.logprobs else None,
                          "finish_reason": delta.finish_reason}
                _annotate_chunk(choice, body, generation, index, delta)
                yield envelope("chat.completion.chunk", [choice])
            if body.stream_options and body.stream_options.include_usage:
                yield {**envelope("chat.completion.chunk", []), "usage": generation.usage()}
        return _sse(chunks())

    results = await _cancel_on_disconnect(request, generation.run_to_end())
    return {**envelope("chat.completion", [{
        "index": r.index, "message": {"role": "assistant", "content": r.text},
        "logprobs": _chat_logprobs(r.logprobs) if body.logprobs else None,
        "finish_reason": r.finish_reason, "steering": generation.report(r.index),
        **_token_ids(body, generation, r),
    } for r in results]), "usage": generation.usage()}


async def _particles(state: ServerState, body: GenerationRequest, plan: Plan,
                     prompt: list[int], max_tokens: int | None, request: Request, obj: str):
    """A particle-filter request: the selected particle as the one choice; streamed as one
    progress chunk per iteration, then the answer."""
    reject_particle_conflicts(body, plan)
    label = (state.model_name, plan.label)
    run = ParticleRun(state.engine, state.metrics, state.particles, plan.particles, prompt,
                      sampling_options(body, plan, max_tokens, None, 0), label)
    metrics, arrival = state.metrics, time.monotonic()
    metrics.requests.labels(*label).inc()
    rid, created = f"{'chatcmpl' if obj == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}", \
        int(time.time())
    chat = obj == "chat.completion"

    def envelope(choices: list[dict], stream: bool) -> dict:
        return {"id": rid, "object": f"{obj}.chunk" if stream and chat else obj,
                "created": created, "model": state.model_name, "choices": choices}

    def finished(result: ParticleResult) -> dict:
        """The choice's fields beside its text; records the request's metrics."""
        chosen = result.chosen
        outcome = ChoiceResult(
            index=0, text=chosen.text, token_ids=chosen.token_ids,
            entropy=[h for s in chosen.steps for h in s.entropy],
            varentropy=[v for s in chosen.steps for v in s.varentropy])
        metrics.observe_tokens(*label, outcome.entropy, outcome.varentropy)
        metrics.e2e.labels(*label).observe(time.monotonic() - arrival)
        report = steering_report(plan, outcome, run.sampling, None)
        report["particles"] = result.report(plan.particles)
        reason = "length" if len(outcome.token_ids) >= run.sampling.max_tokens else "stop"
        return {"index": 0, "logprobs": None, "finish_reason": reason, "steering": report,
                **({"token_ids": outcome.token_ids} if body.return_token_ids else {})}

    def usage(result: ParticleResult) -> dict:
        return {"prompt_tokens": len(prompt), "completion_tokens": result.generated_tokens,
                "total_tokens": len(prompt) + result.generated_tokens}

    async def counted(work):
        try:
            return await work
        except BaseException as exc:
            metrics.count_error(*label, exc)
            raise

    if body.stream:
        async def chunks() -> AsyncIterator[dict]:
            progress: asyncio.Queue = asyncio.Queue()
            task = asyncio.create_task(counted(run.run(on_step=progress.put)))
            task.add_done_callback(lambda _: progress.put_nowait(None))
            try:
                while (step := await progress.get()) is not None:
                    yield {**envelope([], True),
                           "steering": {"particles": {"progress": asdict(step)}}}
                result = await task
            finally:
                task.cancel()
            choice = finished(result)
            text = result.chosen.text
            choice.update({"delta": {"role": "assistant", "content": text}} if chat
                          else {"text": text})
            yield envelope([choice], True)
            if body.stream_options and body.stream_options.include_usage:
                yield {**envelope([], True), "usage": usage(result)}
        return _sse(chunks())

    result = await _cancel_on_disconnect(request, counted(run.run()))
    choice = finished(result)
    text = result.chosen.text
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    if body.return_token_ids:
        choice["prompt_token_ids"] = prompt
    return {**envelope([choice], False), "usage": usage(result)}


def _fan_out(body: GenerationRequest, plan: Plan, routed: list, max_tokens: int | None,
             logprobs: int | None) -> tuple[list, list]:
    """Jobs (prompt ids, options) for prompts × n, and each job's DiffAdapt decision."""
    jobs, decisions = [], []
    for prompt, decision in routed:
        for j in range(body.n):
            jobs.append((prompt, sampling_options(body, plan, max_tokens, logprobs, j, decision)))
            decisions.append(decision)
    return jobs, decisions


def _token_ids(body: GenerationRequest, generation: Generation, result: ChoiceResult) -> dict:
    if not body.return_token_ids:
        return {}
    return {"prompt_token_ids": generation.jobs[result.index][0], "token_ids": result.token_ids}


def _annotate_chunk(choice: dict, body: GenerationRequest, generation: Generation, index: int,
                    delta) -> None:
    """Our extensions on a stream chunk: token ids and per-token entropy when asked, and the
    full steering report on a choice's last chunk."""
    if body.return_token_ids:
        choice["token_ids"] = delta.token_ids
    plan = generation.plan
    if delta.finish_reason is not None:
        choice["steering"] = generation.report(index)
        if plan.return_entropy:  # the chunk's own tokens, like every other chunk
            choice["steering"]["chunk_entropy"] = delta.entropy
            choice["steering"]["chunk_varentropy"] = delta.varentropy
    elif plan.return_entropy:
        choice["steering"] = {"chunk_entropy": delta.entropy,
                              "chunk_varentropy": delta.varentropy}


def _completion_logprobs(logprobs: list[TokenLogprob] | None, offset: int) -> dict | None:
    if not logprobs:
        return None
    offsets, position = [], offset
    for lp in logprobs:
        offsets.append(position)
        position += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [dict(lp.top) for lp in logprobs],
        "text_offset": offsets,
    }


def _chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict:
    return {"content": [{
        "token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top],
    } for lp in logprobs or []]}


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events; an error after the stream started is sent as an error event."""
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the status line is gone: report in-band, as OpenAI does
            status = getattr(exc, "status", 500)
            message = getattr(exc, "message", "internal error")
            yield "data: " + json.dumps({"error": {
                "message": message, "type": getattr(exc, "type", "server_error"),
                "param": getattr(exc, "param", None), "code": status}}) + "\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _cancel_on_disconnect(request: Request, work):
    """Run `work`; if the client goes away first, cancel it (which aborts its engine requests)
    and end with a 499 that no one reads, rather than a cancelled task's traceback in the log."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    await asyncio.wait({task})  # until its engine requests are aborted
    if not task.cancelled():
        task.exception()  # retrieved: the client gets no answer either way
    raise ClientClosed("the client closed the connection before the response")
