"""OpenAI-compatible routes: models, completions, chat completions, tokenization, health,
version, metrics.

Both generation routes take one path (`generate`), told apart by a `Dialect`: vLLM's serving
layer answers the request (`server.openai_serving`), steered through a session of the engine
client, and the answer gains its steering reports. The particle filter, which orchestrates many
engine requests itself, answers in the same dialects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeResponse, TokenizeResponse

from server.deps import Hold, HoldDep, ServerState, StateDep, require_api_key
from server.diffadapt import Decision, reject_conflicts
from server.engine import PromptOverride, SteeringSession
from server.errors import (
    ERROR_RESPONSES,
    ClientClosed,
    EngineBusy,
    EngineUnavailable,
    InvalidRequest,
    NotFound,
    in_band_error,
)
from server.generation import (
    ChatCompletionResponse,
    CompletionResponse,
    Plan,
    sampling_options,
    steering_report,
)
from server.methods import Outcome
from server.openai_serving import (
    OpenAIServing,
    annotate_response,
    annotate_stream,
    raise_error,
    tidy_choice,
)
from server.particles import ParticleResult, ParticleRun
from server.particles import reject_conflicts as reject_particle_conflicts
from server.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationRequest,
    TokenizeRequest,
)
from steering.diffadapt import Framing

logger = logging.getLogger("entropy_steer.routes")

IGNORED_FIELDS_HEADER = "X-Steer-Ignored-Fields"

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
tokens = APIRouter(dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
ops = APIRouter(responses=ERROR_RESPONSES)


@dataclass(frozen=True)
class Dialect:
    """What tells the two generation routes apart."""

    object: str  # the answer's `object`; a stream chunk's is `chunk_object`
    chunk_object: str
    id_prefix: str
    create: Callable[[OpenAIServing, GenerationRequest, Request], Awaitable]
    prompt_ids: Callable[[OpenAIServing, GenerationRequest], Awaitable[list[list[int]]]]
    text_field: str  # where a choice's text goes: "message" (chat) or "text"

    def choice_text(self, text: str, stream: bool) -> dict:
        if self.text_field == "text":
            return {"text": text}
        message = {"role": "assistant", "content": text}
        return {"delta": message} if stream else {"message": {**message, "refusal": None}}


async def _chat_prompt_ids(serving: OpenAIServing, body) -> list[list[int]]:
    return [await serving.chat_prompt_ids(body)]


CHAT = Dialect("chat.completion", "chat.completion.chunk", "chatcmpl",
               lambda serving, body, raw: serving.chat.create_chat_completion(body, raw),
               _chat_prompt_ids, "message")
COMPLETION = Dialect("text_completion", "text_completion", "cmpl",
                     lambda serving, body, raw: serving.completion.create_completion(body, raw),
                     lambda serving, body: serving.completion_prompt_ids(body), "text")


@ops.get("/health")
async def health(state: StateDep):
    if not state.engine.healthy:
        raise EngineUnavailable("the engine is not running")
    return {"status": "ok"}


@ops.get("/ping")
@ops.post("/ping")  # one route per method: each gets its own OpenAPI operation id
async def ping(state: StateDep):
    """`vllm serve`'s liveness route: the same answer as /health."""
    return await health(state)


@ops.get("/version")
async def version():
    from importlib.metadata import version as installed

    import vllm

    return {"version": vllm.__version__, "entropy_steer": installed("entropy-steer")}


@ops.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: StateDep):
    return Response(generate_latest(state.engine.prometheus_registry()),
                    media_type=CONTENT_TYPE_LATEST)


@v1.get("/models")
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


def _streamable(model) -> dict:
    return {200: {"model": model, "description": "a JSON body, or server-sent events with "
                  "`stream: true`; every choice carries a `steering` report",
                  "content": {"text/event-stream": {}}}}


@v1.post("/completions", responses=_streamable(CompletionResponse))
async def completions(body: CompletionRequest, request: Request, state: StateDep,
                      hold: HoldDep):
    return await generate(COMPLETION, body, request, state, hold)


@v1.post("/chat/completions", responses=_streamable(ChatCompletionResponse))
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep,
                           hold: HoldDep):
    return await generate(CHAT, body, request, state, hold)


async def generate(dialect: Dialect, body: GenerationRequest, request: Request,
                   state: ServerState, hold: Hold) -> Response:
    """One generation request, whatever the dialect."""
    if body.model is not None and body.model != state.model_name:
        raise NotFound(f"model '{body.model}' is not served here; this server serves "
                       f"'{state.model_name}'", param="model", code="model_not_found")
    ignored = body.ignored_fields
    if ignored and state.strict_fields:
        raise InvalidRequest(f"unknown field '{ignored[0]}' (this server runs with "
                             "--strict-fields)", ignored[0])
    if ignored:
        logger.info("ignored unknown request fields: %s", ", ".join(map(repr, ignored)))
    prompts = body.prompts() if isinstance(body, CompletionRequest) else [None]
    for prompt in prompts:
        if isinstance(prompt, list):
            state.engine.check_token_ids(prompt)
    plan = Plan.of(body)
    particles = plan.get("particles")
    try:
        hold.take(particles.n if particles else len(prompts) * (body.n or 1))
    except EngineBusy as exc:
        state.metrics.count_error(state.model_name, plan.label, exc)
        raise
    if particles:
        response = await _particles(dialect, state, body, plan, request)
    else:
        response = await _steered(dialect, state, body, plan, request)
    if isinstance(response, StreamingResponse):
        response.body_iterator = _giving_back(response.body_iterator, hold)
    else:
        hold.give_back()
    if ignored:  # percent-encoded: a field name may hold any character, a header may not
        response.headers[IGNORED_FIELDS_HEADER] = ",".join(quote(f, safe="") for f in ignored)
    return response


async def _steered(dialect: Dialect, state: ServerState, body: GenerationRequest, plan: Plan,
                   request: Request) -> Response:
    """vLLM's serving layer answers; the session steers every engine request it makes."""
    engine, metrics = state.engine, state.metrics
    if body.use_beam_search and (plan.used or plan.return_entropy):
        raise InvalidRequest("use_beam_search does not combine with steering: vLLM's beam "
                             "search makes its own one-token engine requests, which no "
                             "steering method or entropy trace reaches", "use_beam_search")
    steering = engine.check_steering(plan.engine_steering())
    session = engine.client.open_session(steering, bool(body.stream) and plan.return_entropy)
    body.bind(session.id)
    decisions: list[Decision] = []
    if plan.get("diffadapt"):
        body, decisions = await _diffadapt(dialect, state, body, plan, session)
    labels = (state.model_name, plan.label)
    n = body.n or 1

    def report(session: SteeringSession, index: int) -> dict:
        record = session.record(index)
        if record is None:  # a beam of vLLM's beam search: nothing steered, nothing measured
            return {"methods": [], "entropy": None, "varentropy": None}
        entropy, varentropy = record.window(0)
        outcome = Outcome(record.steering, decisions[index // n] if decisions else None,
                          record.hidden_states, record.vreason,
                          record.trace.gates[:record.produced], record.continued)
        return steering_report(plan, outcome, entropy, varentropy)

    def finished(index: int) -> None:
        record = session.record(index)
        entropy, varentropy = record.window(0)
        metrics.observe_tokens(*labels, entropy, varentropy)
        steps = record.trace.gates[:record.produced]
        if plan.get("east"):
            metrics.steered_tokens.labels(*labels).inc(record.steered)
        elif record.steering.gate_east:  # the tokens a gate's vector steered (see Gates.report)
            metrics.steered_tokens.labels(*labels).inc(
                sum(1 for s in steps[:-1] if s and s.east >= 0))
        if plan.get("gates"):
            metrics.observe_gates(state.model_name, record.steering.gates, steps)

    def request_done() -> None:
        firsts = [r.first_token_at for r in session.choices.values() if r.first_token_at]
        if firsts:
            metrics.ttft.labels(*labels).observe(max(0.0, min(firsts) - session.arrival))
        metrics.e2e.labels(*labels).observe(time.time() - session.arrival)

    metrics.requests.labels(*labels).inc()
    try:
        result = await _cancel_on_disconnect(request, dialect.create(state.serving, body,
                                                                     request))
        raise_error(result)
    except BaseException as exc:
        metrics.count_error(*labels, exc)
        raise
    if hasattr(result, "model_dump"):
        data = annotate_response(result.model_dump(), session, report)
        for index in sorted(session.choices):
            finished(index)
        request_done()
        return JSONResponse(data)

    async def events() -> AsyncIterator[str]:
        try:
            async for event in annotate_stream(result, session, report, plan.return_entropy,
                                               finished):
                yield event
            request_done()
        except BaseException as exc:
            metrics.count_error(*labels, exc)
            raise
    return _event_stream(events())


async def _diffadapt(dialect: Dialect, state: ServerState, body: GenerationRequest,
                     plan: Plan, session: SteeringSession):
    """Probe each question, then the request as the strategies frame it, with each prompt's
    temperature, top-p and budget set in the session."""
    options = plan.get("diffadapt")
    recipe = state.router.recipe(options)  # a 404 before any work
    reject_conflicts(body, recipe)
    limit = body.token_limit if "max_tokens" in body.model_fields_set \
        or "max_completion_tokens" in body.model_fields_set else None
    if dialect is CHAT:
        messages = list(body.messages)
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"),
                        default=None)
        if last_user is None or not isinstance(messages[last_user].get("content"), str):
            raise InvalidRequest("steering.diffadapt needs a user message with text content "
                                 "(the question)", "messages")
        prefills = [s.prefill for s in recipe.strategies.values()] + [
            c.prefill for c in (options.strategies or {}).values()]
        if (recipe.chat_only or any(prefills)) and (
                last_user != len(messages) - 1
                or "continue_final_message" in body.model_fields_set):
            raise InvalidRequest("a DiffAdapt prefill continues the conversation with the "
                                 "assistant's turn: the last message must be the user's "
                                 "question, without continue_final_message", "messages")
        has_system = any(m.get("role") in ("system", "developer") for m in messages)

        def asking(question: str, framing: Framing):
            changed = [*messages]
            changed[last_user] = {**messages[last_user], "content": framing.wrap(question)}
            if framing.system and not has_system:
                changed.insert(0, {"role": "system", "content": framing.system})
            update = {"messages": changed}
            if framing.prefill:  # the model continues the assistant's turn from it
                changed.append({"role": "assistant", "content": framing.prefill})
                update |= {"continue_final_message": True, "add_generation_prompt": False}
            return body.model_copy(update=update)

        async def render(question: str, framing: Framing) -> list[int]:
            return (await CHAT.prompt_ids(state.serving, asking(question, framing)))[0]

        questions = [messages[last_user]["content"]]
    else:
        if recipe.chat_only:
            raise InvalidRequest("a paper-recipe probe reads the question through the chat "
                                 "template: send it to /v1/chat/completions",
                                 "steering.diffadapt.probe")
        questions = body.prompts()
        if not all(isinstance(q, str) for q in questions):
            raise InvalidRequest("steering.diffadapt wraps the question in a strategy prompt: "
                                 "send the prompt as text", "prompt")

        async def render(question: str, framing: Framing) -> list[int]:
            return state.engine.encode(framing.wrap(question) + framing.prefill)

    decisions = await state.router.route(options, questions, render, limit)
    if dialect is CHAT:
        body = asking(questions[0], decisions[0].strategy)
    else:
        body = body.model_copy(update={"prompt": [d.strategy.wrap(q) + d.strategy.prefill
                                                  for d, q in zip(decisions, questions)]})
    body.bind(session.id)
    for ordinal, decision in enumerate(decisions):
        s = decision.strategy
        session.overrides[ordinal] = PromptOverride(temperature=s.temperature, top_p=s.top_p,
                                                    max_tokens=decision.max_tokens,
                                                    continuation=decision.continuation)
    return body, decisions


async def _particles(dialect: Dialect, state: ServerState, body: GenerationRequest,
                     plan: Plan, request: Request) -> Response:
    """A particle-filter request: the selected particle as the one choice; streamed as one
    progress chunk per iteration, then the answer."""
    reject_particle_conflicts(body, plan)
    prompts = await dialect.prompt_ids(state.serving, body)
    if len(prompts) != 1:
        raise InvalidRequest("steering.particles takes one prompt", "prompt")
    prompt = prompts[0]
    label = (state.model_name, plan.label)
    options = plan.get("particles")
    run = ParticleRun(state.engine, state.metrics, state.particles, options, prompt,
                      sampling_options(body, plan, body.token_limit), label)
    metrics, arrival = state.metrics, time.monotonic()
    metrics.requests.labels(*label).inc()
    rid, created = f"{dialect.id_prefix}-{uuid.uuid4().hex}", int(time.time())

    def envelope(choices: list[dict], stream: bool) -> dict:
        return {"id": rid, "object": dialect.chunk_object if stream else dialect.object,
                "created": created, "model": state.model_name, "choices": choices}

    def finished(result: ParticleResult) -> dict:
        """The choice's fields beside its text; records the request's metrics."""
        chosen = result.chosen
        entropy = [h for s in chosen.steps for h in s.entropy]
        varentropy = [v for s in chosen.steps for v in s.varentropy]
        metrics.observe_tokens(*label, entropy, varentropy)
        metrics.e2e.labels(*label).observe(time.monotonic() - arrival)
        report = steering_report(plan, Outcome(run.sampling), entropy, varentropy)
        report["particles"] = result.report(options)
        reason = "length" if len(chosen.token_ids) >= run.sampling.max_tokens else "stop"
        return {"index": 0, "logprobs": None, "finish_reason": reason, "steering": report,
                **({"token_ids": chosen.token_ids} if body.return_token_ids else {})}

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
        async def chunks() -> AsyncIterator[str]:
            progress: asyncio.Queue = asyncio.Queue()
            task = asyncio.create_task(counted(run.run(on_step=progress.put)))
            task.add_done_callback(lambda _: progress.put_nowait(None))
            try:
                while (step := await progress.get()) is not None:
                    yield _event({**envelope([], True),
                                  "steering": {"particles": {"progress": asdict(step)}}})
                result = await task
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the status line is gone: report in-band
                yield _event(in_band_error(exc))
                yield "data: [DONE]\n\n"
                return
            finally:
                task.cancel()
            choice = {**dialect.choice_text(result.chosen.text, True), **finished(result)}
            yield _event(envelope([choice], True))
            if body.stream_options and body.stream_options.include_usage:
                yield _event({**envelope([], True), "usage": usage(result)})
            yield "data: [DONE]\n\n"
        return _event_stream(chunks())

    result = await _cancel_on_disconnect(request, counted(run.run()))
    choice = tidy_choice({**dialect.choice_text(result.chosen.text, False), **finished(result)})
    if body.return_token_ids:
        choice["prompt_token_ids"] = prompt
    return JSONResponse({**envelope([choice], False), "usage": usage(result)})


async def _giving_back(events: AsyncIterator[str], hold: Hold) -> AsyncIterator[str]:
    """A stream that gives its hold back after its last event is produced (before the
    response's end is sent)."""
    async for event in events:
        yield event
    hold.give_back()


def _event(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
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
