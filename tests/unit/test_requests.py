"""The generation requests on vLLM's models: null is unset, the extensions, the session seam,
and answers cleaned to OpenAI's schema (no engine)."""

import copy
import functools
import operator

import pytest
from pydantic import TypeAdapter, ValidationError

from server.errors import InvalidRequest, validation_error
from server.openai_responses import ResponsesRequest
from server.requests import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from server.serving import tidy_message, without_nulls
from steering.engine.session import ORDINAL_KEY, SESSION_KEY, SteeringSession
from tests.openai_spec import CHAT_RESPONSE, validate

CHAT = [{"role": "user", "content": "hi"}]


def refusal(model, body: dict) -> InvalidRequest:
    """The 400 a body gets, whichever way pydantic raised it."""
    try:
        TypeAdapter(model).validate_python(body)
    except ValidationError as exc:
        return validation_error(exc.errors())
    except InvalidRequest as exc:
        return exc
    pytest.fail(f"accepted {body}")


def test_null_is_unset_for_every_optional_field():
    nulls = {name: None for name, info in ChatCompletionRequest.model_fields.items()
             if not info.is_required()}
    request = ChatCompletionRequest.model_validate({"messages": CHAT, **nulls})
    default = ChatCompletionRequest.model_validate({"messages": CHAT})
    skip = {"request_id"}  # a fresh random id each time
    assert {k: v for k, v in request.model_dump().items() if k not in skip} == \
        {k: v for k, v in default.model_dump().items() if k not in skip}
    assert request.ignored_fields == []


def test_unknown_fields_are_kept_aside_and_named():
    request = CompletionRequest.model_validate({"prompt": "x", "zeta": 1, "alpha": [2]})
    assert request.ignored_fields == ["alpha", "zeta"]
    assert refusal(CompletionRequest, {"prompt": "x", "steering": {"frob": 1}}).param == \
        "steering.frob"


@pytest.mark.parametrize("body,param", [
    ({"vllm_xargs": {"steer_typical_p": 0.1}}, "vllm_xargs"),
    ({"n": 17}, "n"),
    ({"typical_p": 0}, "typical_p"),
    ({"typical_p": "0.5"}, "typical_p"),
    ({"steering": {"gates": [{"signal": "entropy", "above": 1, "then": {
        "east": {"vector": "v", "positions": "all"}}}]}}, "steering.gates.0.then"),
    ({"steering": {"gates": [{"signal": "entropy_ema", "ema": 1.0, "below": 1, "then": {
        "top_k": 2}}]}}, "steering.gates.0.ema"),
    ({"steering": {"dynatemp": {"range": -0.1}}}, "steering.dynatemp.range"),
])
def test_extensions_are_checked(body, param):
    assert refusal(ChatCompletionRequest, {"messages": CHAT, **body}).param == param


def test_both_typical_forms_are_refused():
    error = refusal(ChatCompletionRequest, {"messages": CHAT, "typical_p": 0.5,
                                            "steering": {"typical": {"p": 0.5}}})
    assert "not both" in error.message


def test_sampling_params_carry_the_session_and_each_prompts_ordinal():
    request = CompletionRequest.model_validate({"prompt": ["a", "b"], "vllm_xargs": {"k": 1}})
    assert request.to_sampling_params(4, {}).extra_args == {"k": 1}  # not bound: untouched
    request.bind(SteeringSession("s-1", {}, stream_entropy=False))
    first, second = (request.to_sampling_params(4, {}) for _ in range(2))
    assert first.extra_args == {"k": 1, SESSION_KEY: "s-1", ORDINAL_KEY: 0}
    assert second.extra_args[ORDINAL_KEY] == 1
    assert request.vllm_xargs == {"k": 1}  # the request's own dict is not changed


def test_vllm_answer_nulls_are_dropped_where_the_schema_forbids_them():
    answer = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
              "system_fingerprint": None, "service_tier": None,
              "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                           "stop_reason": None, "token_ids": None,
                           "message": {"role": "assistant", "content": None, "refusal": None,
                                       "annotations": None, "function_call": None,
                                       "tool_calls": [], "reasoning": None}}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
                        "prompt_tokens_details": None, "completion_tokens_details": None}}
    with pytest.raises(AssertionError):
        validate(CHAT_RESPONSE, answer)
    cleaned = without_nulls(answer)
    tidy_message(cleaned["choices"][0]["message"])
    validate(CHAT_RESPONSE, cleaned)
    assert cleaned["choices"][0]["message"] == {"role": "assistant", "content": None,
                                                "refusal": None}
    assert cleaned["choices"][0]["stop_reason"] is None


def test_plan_reads_every_method_once_and_reports_each():
    from dataclasses import replace

    from steering.methods.base import Outcome
    from steering.methods.plan import Plan, SteeringReport

    request = ChatCompletionRequest.model_validate({"messages": CHAT, "typical_p": 0.5,
        "steering": {"east": {"vector": "v", "scale": 2.0}, "vreason": {"every": 3},
                     "return_hidden_states": [3, "final", 3], "return_entropy": True}})
    plan = Plan.of(request)
    assert plan.methods == ("east", "typical", "vreason") and plan.label == "east+typical+vreason"
    steering = {m.name: m.settings(plan.used[m.name]) for m in plan.methods_used}
    assert steering["typical"] == 0.5 and steering["east"][0].vector == "v"
    assert steering["hidden_states"] == ((3,), True)
    assert steering["vreason"].every == 3
    assert [m.param for m in plan.methods_used if not m.in_orchestration] == [
        "steering.vreason", "steering.return_hidden_states"]
    ran = {**steering, "east": (replace(steering["east"][0], layers=(7,)),)}
    report = plan.report(Outcome(ran, entropy=[1.0, None], varentropy=[2.0, None], collected={
        "hidden_states": {3: [0.5], "final": [0.25]}, "vreason": {"updates": []}}))
    assert report["typical"] == {"p": 0.5}
    assert report["east"] == [{"vector": "v", "scale": 2.0, "layers": [7],
                               "positions": "generated"}]
    assert report["vreason"]["every"] == 3 and report["vreason"]["updates"] == []
    assert report["hidden_states"] == {"3": [0.5], "final": [0.25]}
    assert report["entropy"] == {"mean": 1.0, "max": 1.0, "last": 1.0}
    assert report["token_entropy"] == [1.0, None]
    SteeringReport.model_validate(report)  # the schema /openapi.json publishes
    plain = Plan.of(ChatCompletionRequest.model_validate({"messages": CHAT, "typical_p": 1}))
    assert plain.methods == () and plain.label == "none"  # τ = 1 is no typical sampling


def test_the_gates_report_reads_each_tokens_gate_step():
    from steering.methods.base import Outcome
    from steering.methods.plan import Plan, SteeringReport

    request = CompletionRequest.model_validate({"prompt": "x", "steering": {
        "dynatemp": {"range": 0.5},
        "gates": [{"signal": "entropy", "above": 2.0, "hold": 2, "then": {"temperature": 0.3}},
                  {"signal": "varentropy", "below": 1.0, "then": {
                      "east": {"vector": "v", "scale": 3.0}}}]}})
    plan = Plan.of(request)
    assert plan.methods == ("dynatemp", "gates")
    assert all(m.in_orchestration for m in plan.methods_used)
    # per token, as the gate processor sends it: temperature, fired and on (bit g: gate g),
    # the gate whose EAST action steers the next token, each gate's signal
    values = [[0.3, 0b01, 0b01, -1, 2.5, 0.4], [0.3, 0b10, 0b11, 1, 1.5, 0.2],
              None, [1.1, 0, 0, -1, 1.0, 3.0]]  # token 2 never measured
    steering = {m.name: m.settings(plan.used[m.name]) for m in plan.methods_used}
    report = plan.report(Outcome(steering, entropy=[2.5, 1.5, None, 1.0],
                                 varentropy=[0.4, 0.2, None, 3.0], values={"gates": values}))
    assert report["gates"] == {"gates": [
        {"signal": "entropy", "then": {"temperature": 0.3}, "fired_count": 1, "fired": [0],
         "values": [2.5], "held": [0, 1]},
        {"signal": "varentropy", "then": {"east": {"vector": "v", "scale": 3.0,
                                                   "positions": "generated"}},
         "fired_count": 1, "fired": [1], "values": [0.2], "held": [1]}],
        "east_tokens": [2]}  # token 1's firing steers the pass that yields token 2
    assert report["dynatemp"] == {"range": 0.5, "exponent": 1.0,
                                  "temperatures": [0.3, 0.3, None, 1.1]}
    SteeringReport.model_validate(report)


@pytest.mark.parametrize("field,value", [("n", True), ("max_tokens", "5"), ("stream", "yes"),
                                         ("seed", False), ("temperature", "0.5"),
                                         ("logprobs", 1.5)])
def test_scalar_json_types_are_strict(field, value):
    """Where vLLM's models would coerce (`true` → 1, `"5"` → 5), this server refuses."""
    assert refusal(CompletionRequest, {"prompt": "x", field: value}).param == field
    CompletionRequest.model_validate({"prompt": "x", "temperature": 1, "top_p": 0.5})


TOOL = {"type": "function", "function": {"name": "f", "defer_loading": False}}


@pytest.mark.parametrize("model,body,path,bad", [
    (ChatCompletionRequest, {"messages": CHAT, "tools": [TOOL]},
     ("tools", 0, "function", "defer_loading"), 0),
    (ChatCompletionRequest, {"messages": CHAT, "stream": True,
                             "stream_options": {"include_usage": True}},
     ("stream_options", "include_usage"), 1),
    (TokenizeRequest, {"prompt": "x", "add_special_tokens": True}, ("add_special_tokens",), 1),
    (TokenizeRequest, {"messages": CHAT, "add_generation_prompt": True},
     ("add_generation_prompt",), "yes"),
])
def test_json_types_are_strict_at_every_depth(model, body, path, bad):
    TypeAdapter(model).validate_python(body)
    broken = copy.deepcopy(body)
    parent = functools.reduce(operator.getitem, path[:-1], broken)
    parent[path[-1]] = bad
    assert refusal(model, broken).param == ".".join(map(str, path))



def test_iterable_fields_are_validated_and_kept_as_lists():
    """pydantic validates an `Iterable` field (OpenAI's typed dicts have many, e.g. the tools
    of an `additional_tools` input item) only as it is iterated, and then only once: the
    server validates it with the body and keeps the list."""
    item = {"type": "additional_tools", "role": "developer",
            "tools": [{"type": "mcp", "server_label": "docs", "require_approval": "never"}]}
    request = ResponsesRequest.model_validate({"input": [item]})
    tools = request.input[0]["tools"]
    assert isinstance(tools, list) and [tool["require_approval"] for tool in tools] == ["never"]
    item["tools"][0]["require_approval"] = "sometimes"
    assert refusal(ResponsesRequest, {"input": [item]}).param.startswith("input.0.tools.0.")
