"""Apps written for `vllm serve` pointed at this server, unchanged: LangChain, instructor,
its_hub's particle filter (the reference implementation of the ePF paper's baseline), the OpenAI
Agents SDK (on the Responses and the Chat Completions routes) and pydantic-ai."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel, Field

from tests.conftest import API_KEY

MODEL = "SmolLM2-135M-Instruct"


class Cat(BaseModel):
    """A cat."""

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)


@pytest.fixture(scope="module")
def chat_model(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=f"{server.base_url}/v1", api_key=API_KEY,
                      temperature=0, max_tokens=48, max_retries=0, timeout=120)


def test_langchain_invoke_and_stream(chat_model):
    whole = chat_model.invoke("Name a color.")
    assert whole.content
    pieces = [chunk.content for chunk in chat_model.stream("Name a color.")]
    assert len(pieces) > 1 and "".join(pieces) == whole.content


def test_langchain_structured_output_and_bound_tool(chat_model):
    cat = chat_model.with_structured_output(Cat, method="json_schema").invoke(
        "Describe a cat.")
    assert isinstance(cat, Cat)

    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    bound = chat_model.bind_tools([get_weather], tool_choice="get_weather")
    message = bound.invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)


@pytest.mark.parametrize("mode", ["TOOLS", "TOOLS_STRICT", "JSON_SCHEMA"])
def test_instructor_modes(openai_client, mode):
    """The modes whose output a grammar holds to the model's schema. (JSON mode asks for any
    JSON object, `response_format: json_object`, which is honoured but leaves closing the
    object to the model; the 135M model rambles past any small budget.)"""
    import instructor

    client = instructor.from_openai(openai_client, mode=getattr(instructor.Mode, mode))
    cat = client.chat.completions.create(
        model=MODEL, response_model=Cat, max_retries=0, max_tokens=200, temperature=0,
        messages=[{"role": "user", "content": "Describe a cat."}])
    assert isinstance(cat, Cat)


def test_its_hub_particle_filter_drives_the_server(server):
    """its_hub's particle filtering, as its users run it against vLLM: step generation through
    our chat route (assistant prefixes continued, stop strings kept), a rule-based process
    reward, a few problems, bounded."""
    from its_hub import AbstractProcessRewardModel, OpenAICompatibleLanguageModel, StepGeneration
    from its_hub.core.algorithms.particle_gibbs import ParticleFiltering

    class DigitShare(AbstractProcessRewardModel):
        """Scores each partial answer by its share of digits (enough to rank steps)."""

        def score(self, prompt, steps: list[str]) -> list[float]:
            return [min(0.99, max(0.01, sum(c.isdigit() for c in s) / max(1, len(s))))
                    for s in steps]

        async def ascore(self, prompt, steps: list[str]) -> list[float]:
            return self.score(prompt, steps)

    lm = OpenAICompatibleLanguageModel(endpoint=f"{server.base_url}/v1", api_key=API_KEY,
                                       model_name=MODEL, max_completion_tokens=24,
                                       temperature=0.8, max_tries=1)
    generation = StepGeneration(max_steps=3, step_token="\n", include_stop_str_in_output=True)
    filter_ = ParticleFiltering(generation, DigitShare())

    async def run() -> list[str]:
        return [await filter_.ainfer(lm, question, budget=2)
                for question in ("What is 3 + 4?", "What is 10 - 6?")]

    answers = asyncio.run(run())
    assert len(answers) == 2
    for answer in answers:
        text = answer["content"] if isinstance(answer, dict) else str(answer)
        assert isinstance(text, str) and text.strip(), json.dumps(answer)


def _weather_agent(server, model_class, calls: list[str]):
    """An agent that must call its function tool (`tool_choice: required`) before answering."""
    from agents import Agent, ModelSettings, function_tool
    from openai import AsyncOpenAI

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)
    return Agent(name="weather", instructions="Answer briefly.", tools=[get_weather],
                 model=model_class(model=MODEL, openai_client=client),
                 model_settings=ModelSettings(tool_choice="required", max_tokens=60,
                                              temperature=0))


@pytest.mark.parametrize("model_class", ["OpenAIResponsesModel", "OpenAIChatCompletionsModel"])
def test_agents_sdk_runs_with_a_required_tool(server, model_class):
    """The OpenAI Agents SDK, plain and streamed: the tool is called with a city, its result
    goes back to the model (a `function_call_output` turn on Responses, a `tool` message on
    chat), and the run ends with the model's answer."""
    import agents

    agents.set_tracing_disabled(True)
    calls: list[str] = []
    agent = _weather_agent(server, getattr(agents, model_class), calls)

    async def run():
        whole = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
        streamed = agents.Runner.run_streamed(agent, "What is the weather in Rome?",
                                              max_turns=4)
        kinds = {event.type async for event in streamed.stream_events()}
        return whole, streamed, kinds

    whole, streamed, kinds = asyncio.run(run())
    assert len(calls) >= 2 and all(isinstance(city, str) and city for city in calls)
    assert isinstance(whole.final_output, str) and whole.final_output
    assert isinstance(streamed.final_output, str) and streamed.final_output
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    tool_outputs = [item for item in whole.new_items if item.type == "tool_call_output_item"]
    assert tool_outputs and "sunny" in tool_outputs[0].output


def _pydantic_ai_model(server):
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=f"{server.base_url}/v1",
                                                          api_key=API_KEY))


@pytest.mark.parametrize("output", ["NativeOutput", "ToolOutput"])
def test_pydantic_ai_structured_output(server, output):
    """pydantic-ai's native structured output (a JSON schema response format) and its tool
    output (a forced tool call): the result is a validated `Cat` either way."""
    import pydantic_ai

    agent = pydantic_ai.Agent(_pydantic_ai_model(server),
                              output_type=getattr(pydantic_ai, output)(Cat),
                              model_settings={"temperature": 0, "max_tokens": 200})
    result = agent.run_sync("Describe a cat.")
    assert isinstance(result.output, Cat)
