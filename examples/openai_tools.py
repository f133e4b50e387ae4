"""An app written for `vllm serve`, unchanged, then with steering on top: structured outputs
through the SDK's `parse`, and a forced tool call, each with EAST and per-token entropy.

    STEER_URL=http://127.0.0.1:8000 python examples/openai_tools.py
"""

import json
import os

from openai import OpenAI
from pydantic import BaseModel, Field

client = OpenAI(base_url=os.environ.get("STEER_URL", "http://127.0.0.1:8000") + "/v1",
                api_key=os.environ.get("STEER_API_KEY", "unused"))
MODEL = "SmolLM2-135M-Instruct"


class Cat(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)


# Structured output, as with plain vLLM; the grammar holds the model to the schema.
reply = client.chat.completions.parse(
    model=MODEL, messages=[{"role": "user", "content": "Describe a cat."}], response_format=Cat,
    max_tokens=48, temperature=0)
print("parsed:", reply.choices[0].message.parsed)

# The same, steered: typical sampling inside the grammar, entropy of every token reported.
reply = client.chat.completions.parse(
    model=MODEL, messages=[{"role": "user", "content": "Describe a cat."}], response_format=Cat,
    max_tokens=48, seed=3, extra_body={"typical_p": 0.5, "steering": {"return_entropy": True}})
steering = reply.choices[0].model_extra["steering"]
print("parsed with typical_p=0.5:", reply.choices[0].message.parsed,
      "entropy per token:", [round(h, 2) for h in steering["token_entropy"]])

# A forced tool call, with an EAST vector on the residual stream.
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                   "required": ["city"]}}}]
reply = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
    max_tokens=48, temperature=0,
    extra_body={"steering": {"east": {"vector": "explore", "scale": 1.0}}})
call = reply.choices[0].message.tool_calls[0]
print("tool call:", call.function.name, json.loads(call.function.arguments),
      "methods:", reply.choices[0].model_extra["steering"]["methods"])
