"""The generation routes: completions, chat completions (one conversation or a batch) and
SageMaker's `/invocations`, one path for all (`generate`), told apart by a `Dialect`.

A request's steering plan (`steering.methods.plan.Plan`) says which methods it uses. If one of
them answers the request itself (a multi-pass orchestration), its events are rendered in the
dialect here; otherwise vLLM's serving layer answers (`server.serving`), steered through a
session of the engine client, after each method's pass before generation, and every choice
gains its steering report. No method is named here: every step loops over the plan.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.deps import Hold, HoldDep, ServerState, StateDep, require_api_key
from server.dialects import CHAT, COMPLETION, OPENAI, Dialect, Rendering
from server.errors import ERROR_RESPONSES, in_band_error
from server.requests import (
    BatchChatCompletionRequest,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    InvocationRequest,
)
from server.responses import ChatCompletionResponse, CompletionResponse
from server.serving import (
    ChoiceReports,
    raise_error,
    tidy_choice,
)
from steering.errors import ClientClosed, EngineBusy, InvalidRequest, NotFound
from steering.methods.base import Answer, Job, Method, Outcome, Sampling
from steering.methods.plan import Plan

logger = logging.getLogger("entropy_steer.routes")

IGNORED_FIELDS_HEADER = "X-Steer-Ignored-Fields"

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)
sagemaker = APIRouter(dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


def _streamable(model) -> dict:
    return {200: {"model": model, "description": "a JSON body, or server-sent events with "
                  "`stream: true`; every choice carries a `steering` report",
                  "content": {"text/event-stream": {}}}}


@router.post("/completions", responses=_streamable(CompletionResponse))
async def completions(body: CompletionRequest, request: Request, state: StateDep,
                      hold: HoldDep):
    return await generate(COMPLETION, body, request, state, hold)


@router.post("/chat/completions", responses=_streamable(ChatCompletionResponse))
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep,
                           hold: HoldDep):
    return await generate(CHAT, body, request, state, hold)


@router.post("/chat/completions/batch", response_model=ChatCompletionResponse)
async def chat_completions_batch(body: BatchChatCompletionRequest, request: Request,
                                 state: StateDep, hold: HoldDep):
    """vLLM's batch route: each conversation is a chat request with the body's other fields
    (steering included), all run at once; choice `i` answers conversation `i`, the usage is
    the sum. One JSON answer (its body has no `stream` or `tools`)."""
    ignored = body.ignored_fields
    _check_ignored(state, ignored)
    work = [asyncio.ensure_future(generated(CHAT, conversation, request, state, hold))
            for conversation in body.conversations()]
    try:
        answers = await asyncio.gather(*work)
    except BaseException:
        for task in work:
            task.cancel()
        await asyncio.gather(*work, return_exceptions=True)
        raise
    hold.give_back()
    usage = {key: sum(a["usage"][key] for a in answers)
             for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    choices = [{**answer["choices"][0], "index": index} for index, answer in enumerate(answers)]
    return _naming(JSONResponse({**answers[0], "choices": choices, "usage": usage}), ignored)


SAGEMAKER_ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"


@sagemaker.post("/invocations", responses=_streamable(ChatCompletionResponse))
async def invocations(body: InvocationRequest, request: Request, state: StateDep,
                      hold: HoldDep):
    """SageMaker's inference route, as `vllm serve` has it: a body with `messages` is a chat
    request, any other a completion request; the model is the adapter the header names (none:
    the served model)."""
    body.model = request.headers.get(SAGEMAKER_ADAPTER_HEADER)
    dialect = CHAT if isinstance(body, ChatCompletionRequest) else COMPLETION
    return await generate(dialect, body, request, state, hold)


async def generate(dialect: Dialect, body: GenerationRequest, request: Request,
                   state: ServerState, hold: Hold, rendering: Rendering = OPENAI,
                   ignored: list[str] | None = None) -> Response:
    """One generation request, whatever the dialect, answered in `rendering`'s shape.
    `ignored`: the unknown fields of the body the client sent (default: `body`'s)."""
    ignored = body.ignored_fields if ignored is None else ignored
    _check_ignored(state, ignored)
    answer = await generated(dialect, body, request, state, hold)
    if isinstance(answer, dict):
        hold.give_back()
        response = JSONResponse(rendering.whole(answer))
    else:
        response = event_stream(_giving_back(rendering.stream(answer), hold))
    return _naming(response, ignored)


def _naming(response: Response, ignored: list[str]) -> Response:
    """`response` with the ignored fields named in its header."""
    if ignored:  # percent-encoded: a field name may hold any character, a header may not
        response.headers[IGNORED_FIELDS_HEADER] = ",".join(quote(f, safe="") for f in ignored)
    return response


def _check_ignored(state: ServerState, ignored: list[str]) -> None:
    if ignored and state.strict_fields:
        raise InvalidRequest(f"unknown field '{ignored[0]}' (this server runs with "
                             "--strict-fields)", ignored[0])
    if ignored:
        logger.info("ignored unknown request fields: %s", ", ".join(map(repr, ignored)))


async def generated(dialect: Dialect, body: GenerationRequest, request: Request,
                    state: ServerState, hold: Hold) -> dict | AsyncIterator[str]:
    """One generation request's answer in its dialect: the whole answer, or its server-sent
    events. Its engine sequences are taken into `hold`."""
    if body.model is not None and body.model != state.model_name:
        raise NotFound(f"model '{body.model}' is not served here; this server serves "
                       f"'{state.model_name}'", param="model", code="model_not_found")
    prompts = body.prompts() if isinstance(body, CompletionRequest) else [None]
    for prompt in prompts:
        if isinstance(prompt, list):
            state.engine.check_token_ids(prompt)
    plan = Plan.of(body)
    try:
        hold.take(plan.sequences(len(prompts) * (body.n or 1)))
    except EngineBusy as exc:
        state.metrics.count_error(plan, exc)
        raise
    plan.check(body)
    orchestrator = plan.orchestrator
    if orchestrator is None:
        return await _served(dialect, state, body, plan, request)
    answer = await _orchestrated(dialect, state, body, plan, orchestrator, request)
    if dialect.from_chat is None:
        return answer
    rendering = dialect.from_chat(body, state)
    return rendering.whole(answer) if isinstance(answer, dict) else rendering.stream(answer)


async def _served(dialect: Dialect, state: ServerState, body: GenerationRequest, plan: Plan,
                  request: Request) -> dict | AsyncIterator[str]:
    """vLLM's serving layer answers; the session steers every engine request it makes."""
    metrics = state.metrics
    if getattr(body, "use_beam_search", False) and (plan.used or plan.return_entropy):
        raise InvalidRequest("use_beam_search does not combine with steering: vLLM's beam "
                             "search makes its own one-token engine requests, which no "
                             "steering method or entropy trace reaches", "use_beam_search")
    steering = plan.settings(state.engine, state.method_states)
    session = state.engine.client.open_session(steering, bool(body.stream) and plan.return_entropy)
    body = await _prepared(dialect, state, body, plan, session)
    body.bind(session)
    reports = ChoiceReports(plan, session, body.n or 1, metrics)
    metrics.count_request(plan)
    try:
        result = await _cancel_on_disconnect(request, dialect.create(state.serving, body,
                                                                     request))
        raise_error(result)
    except BaseException as exc:
        metrics.count_error(plan, exc)
        raise
    if hasattr(result, "model_dump"):
        data = dialect.annotate(result, reports)
        for index in sorted(session.choices):
            reports.finished(index)
        reports.request_finished(time.time())
        return data

    async def events() -> AsyncIterator[str]:
        try:
            async for event in dialect.annotate_stream(result, reports, plan.return_entropy):
                yield event
            reports.request_finished(time.time())
        except BaseException as exc:
            metrics.count_error(plan, exc)
            raise
    return events()


async def _prepared(dialect: Dialect, state: ServerState, body: GenerationRequest, plan: Plan,
                    session) -> GenerationRequest:
    """The request after each method's pass before generation, if it has one (which may set
    each prompt's sampling and outcomes in `session`)."""
    for method in plan.methods_used:
        if not method.prepares:
            continue
        conversation = dialect.conversation(body, state.serving, state.engine)
        body = await method.prepare(plan.used[method.name], conversation, session,
                                    state.method_states.get(method.name))
    return body


async def _orchestrated(dialect: Dialect, state: ServerState, body: GenerationRequest,
                        plan: Plan, orchestrator: Method,
                        request: Request) -> dict | AsyncIterator[str]:
    """A request a method answers itself: its answers as the choices; streamed as one
    progress chunk per event, then the choices. The passes before generation run first; the
    sampling they set for the prompt is the orchestration's. A dialect without choices of its
    own gets the answer in chat's shape (`Dialect.from_chat` converts it)."""
    steering = plan.settings(state.engine, state.method_states)
    session = state.engine.client.open_session(steering, False)
    body = await _prepared(dialect, state, body, plan, session)
    prompts = await dialect.prompt_ids(state.serving, body)
    if len(prompts) != 1:
        raise InvalidRequest(f"{orchestrator.param} takes one prompt", "prompt")
    prompt = prompts[0]
    metrics = state.metrics
    label = (state.model_name, plan.label)
    sampling = _sampling(body)
    if (override := session.overrides.get(0)) is not None:
        sampling = override.applied(sampling)
    job = Job(engine=state.engine, meters=metrics.meters.get(orchestrator.name),
              state=state.method_states.get(orchestrator.name), prompt_ids=prompt,
              sampling=sampling, steering=steering, label=label, choices=body.n or 1)
    events = orchestrator.answer(plan.used[orchestrator.name], job)
    arrival = time.monotonic()
    metrics.count_request(plan)
    rid, created = f"{dialect.id_prefix}-{uuid.uuid4().hex}", int(time.time())
    shape = dialect if dialect.from_chat is None else CHAT

    def envelope(choices: list[dict], stream: bool) -> dict:
        return {"id": rid, "object": shape.chunk_object if stream else shape.object,
                "created": created, "model": state.model_name, "choices": choices}

    def finished(index: int, answer: Answer) -> dict:
        """The choice's fields beside its text; records its metrics."""
        outcome = Outcome(settings=job.steering, tokens=len(answer.token_ids),
                          steered_tokens=len(answer.token_ids), entropy=answer.entropy,
                          varentropy=answer.varentropy, values=answer.values,
                          collected={orchestrator.name: answer.section},
                          prompt=session.prompt_outcomes.get(0, {}))
        metrics.observe_choice(plan, outcome)
        return {"index": index, "logprobs": None, "finish_reason": answer.finish_reason,
                "steering": plan.report(outcome),
                **({"token_ids": answer.token_ids} if body.return_token_ids else {})}

    def usage(answers: list[Answer]) -> dict:
        generated = answers[0].generated_tokens
        return {"prompt_tokens": len(prompt), "completion_tokens": generated,
                "total_tokens": len(prompt) + generated}

    async def counted(work):
        try:
            return await work
        except BaseException as exc:
            metrics.count_error(plan, exc)
            raise

    if body.stream:
        async def chunks() -> AsyncIterator[str]:
            answers: list[Answer] = []
            try:
                async for event in events:
                    if isinstance(event, Answer):
                        answers.append(event)
                        continue
                    yield _event({**envelope([], True),
                                  "steering": {orchestrator.name: {"progress": event.data}}})
            except asyncio.CancelledError:
                metrics.count_error(plan, asyncio.CancelledError())
                raise
            except Exception as exc:  # the status line is gone: report in-band
                metrics.count_error(plan, exc)
                yield _event(in_band_error(exc))
                yield "data: [DONE]\n\n"
                return
            finally:
                await events.aclose()
            for index, answer in enumerate(answers):
                choice = {**shape.choice_text(answer.text, True), **finished(index, answer)}
                yield _event(envelope([choice], True))
            metrics.e2e.labels(*label).observe(time.monotonic() - arrival)
            if body.stream_options and body.stream_options.include_usage:
                yield _event({**envelope([], True), "usage": usage(answers)})
            yield "data: [DONE]\n\n"
        return chunks()

    answers = await _cancel_on_disconnect(request, counted(_answers(events)))
    choices = [tidy_choice({**shape.choice_text(answer.text, False),
                            **finished(index, answer)}) for index, answer in enumerate(answers)]
    metrics.e2e.labels(*label).observe(time.monotonic() - arrival)
    if body.return_token_ids:
        for choice in choices:
            choice["prompt_token_ids"] = prompt
    return {**envelope(choices, False), "usage": usage(answers)}


async def _answers(events: AsyncIterator) -> list[Answer]:
    """An orchestration's answers (the events after its progress)."""
    return [event async for event in events if isinstance(event, Answer)]


def _or(value, default):
    return default if value is None else value


def _sampling(request: GenerationRequest) -> Sampling:
    """How a request a method orchestrates samples, with OpenAI's defaults for unset fields."""
    return Sampling(
        max_tokens=request.token_limit,
        temperature=_or(request.temperature, 1.0),
        top_p=_or(request.top_p, 1.0),
        top_k=request.top_k if request.top_k not in (None, -1) else None,
        min_p=_or(request.min_p, 0.0),
        presence_penalty=_or(request.presence_penalty, 0.0),
        frequency_penalty=_or(request.frequency_penalty, 0.0),
        repetition_penalty=_or(request.repetition_penalty, 1.0),
        seed=request.seed,
        stop=tuple(request.stop_list),
        ignore_eos=request.ignore_eos,
    )


async def _giving_back(events: AsyncIterator[str], hold: Hold) -> AsyncIterator[str]:
    """A stream that gives its hold back after its last event is produced (before the
    response's end is sent)."""
    async for event in events:
        yield event
    hold.give_back()


def _event(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
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
