"""The project's Python SDK (clients/sdk), sync and async.

    STEER_URL=http://127.0.0.1:8000 python examples/client_example.py
"""

import asyncio
import os

from clients.sdk import AsyncClient, Client, SteerError

URL = os.environ.get("STEER_URL", "http://127.0.0.1:8000")
KEY = os.environ.get("STEER_API_KEY")
QUESTION = [{"role": "user", "content": "What is 12 + 7? End with 'Answer: <number>'."}]

with Client(URL, api_key=KEY) as client:
    steering = {"particles": {"n": 4, "max_steps": 4}, "return_entropy": True}
    result = client.chat(QUESTION, steering=steering, max_tokens=64, seed=1)
    print(result.text)
    print("particle steps:", len(result.steering["particles"]["steps"]))

    for event in client.stream_chat(QUESTION, steering={"return_entropy": True},
                                    max_tokens=16):
        print(repr(event.text), event.entropy)

    print([probe["id"] for probe in client.list_artifacts("probes")])

    try:  # a misspelt option is the server's 400, naming the field
        client.chat(QUESTION, steering={"particle": {"n": 4}})
    except SteerError as error:
        print(error.status, error.param)


async def main() -> None:
    async with AsyncClient(URL, api_key=KEY) as client:
        results = await asyncio.gather(*(
            client.complete("The capital of France is", max_tokens=4, temperature=0)
            for _ in range(3)))
        print([r.text for r in results])


asyncio.run(main())
