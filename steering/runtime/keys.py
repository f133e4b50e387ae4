"""The `SamplingParams.extra_args` keys this project reads inside the engine.

Every key starts with `steer_` (a client's `vllm_xargs` may not set such keys). A method's
settings travel under `steer_<method name>`, encoded by its descriptor and decoded by its
adapter; the engine's own keys are these.
"""

PREFIX = "steer_"
STEER_ID = "steer_id"  # str: names the request's telemetry trace, captures and reports


def method_key(name: str) -> str:
    """Where method `name`'s encoded settings travel."""
    return PREFIX + name
