"""The Python SDK for an entropy-steer server, sync (`Client`) and async (`AsyncClient`), over
httpx. It imports nothing from the server: requests are plain JSON, and the request bodies it
builds are checked against the server's `/openapi.json` in the tests.

    from clients.sdk import Client

    with Client("http://127.0.0.1:8000") as client:
        reply = client.chat([{"role": "user", "content": "Name a cat."}], max_tokens=16,
                            steering={"typical": {"p": 0.9}, "return_entropy": True})
        print(reply.text, reply.steering["entropy"]["mean"])
        for event in client.stream_chat([{"role": "user", "content": "Count to five."}],
                                        steering={"return_entropy": True}):
            print(event.text, event.entropy)

Errors from the server, a misspelt steering option among them, raise `SteerError` carrying its
status, message and the offending field (`param`).
"""

from clients.sdk.client import (
    AsyncClient,
    Client,
    Result,
    SteerError,
    StreamEvent,
    bearer_headers,
    checked,
    request_body,
)

__all__ = ["AsyncClient", "Client", "Result", "SteerError", "StreamEvent", "bearer_headers",
           "checked", "request_body"]
