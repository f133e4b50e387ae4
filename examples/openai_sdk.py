"""The official OpenAI SDK against entropy-steer: the extensions go in `extra_body`.

    STEER_URL=http://127.0.0.1:8000 python examples/openai_sdk.py
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("STEER_URL", "http://127.0.0.1:8000") + "/v1",
                api_key=os.environ.get("STEER_API_KEY", "unused"))

# Locally typical sampling with per-token entropy in the response.
reply = client.chat.completions.create(
    model="SmolLM2-135M-Instruct",
    messages=[{"role": "user", "content": "Give me a name for a cat."}],
    max_tokens=24,
    extra_body={"typical_p": 0.9, "steering": {"return_entropy": True}},
)
steering = reply.choices[0].model_extra["steering"]
print(reply.choices[0].message.content)
print("mean token entropy:", round(steering["entropy"]["mean"], 3))

# DiffAdapt with the bundled probe: the server picks the strategy.
reply = client.chat.completions.create(
    model="SmolLM2-135M-Instruct",
    messages=[{"role": "user", "content": "What is 17 times 3? End with 'Answer: <number>'."}],
    max_tokens=128,
    extra_body={"steering": {"diffadapt": {"probe": "default"}}},
)
print("difficulty:", reply.choices[0].model_extra["steering"]["diffadapt"]["difficulty"])

# Streaming with EAST: each chunk carries its tokens' entropy.
stream = client.completions.create(
    model="SmolLM2-135M-Instruct", prompt="Pick a door: A, B or C? Answer:", max_tokens=8,
    stream=True,
    extra_body={"steering": {"east": {"vector": "explore", "scale": 4}, "return_entropy": True}},
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].text, chunk.choices[0].model_extra["steering"]["chunk_entropy"])
