"""The particle filter's rewards besides self-certainty: an external HTTP scorer, and a process
reward model on a second vLLM engine."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import httpx

from steering.errors import EngineUnavailable, UpstreamError


class Reward(StrEnum):
    """Where a trajectory's score comes from."""

    SELF_CERTAINTY = "self_certainty"  # the generator's own step entropy (`core.self_certainty`)
    PRM = "prm"  # a process reward model on a second engine (`RewardModel`)
    HTTP = "http"  # an external scorer (`HttpScorer`)


@dataclass(frozen=True)
class HttpScorer:
    """An external reward service. Contract: POST `url` with
    {"prompt": str, "trajectories": [str, ...]} → 200 {"scores": [float in [0, 1], ...]}, one
    score per trajectory (the partial answer so far). Each call has `timeout` seconds and is
    retried `retries` times on connection errors, timeouts and 5xx."""

    url: str
    timeout: float = 10.0
    retries: int = 1

    async def __call__(self, prompt: str, trajectories: list[str]) -> list[float]:
        last = "no attempt"
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            for _ in range(self.retries + 1):
                try:
                    reply = await client.post(self.url, json={"prompt": prompt,
                                                              "trajectories": trajectories})
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                    continue
                if reply.status_code >= 500:
                    last = f"HTTP {reply.status_code}"
                    continue
                return self._scores(reply, len(trajectories))
        raise UpstreamError(f"the reward scorer at {self.url} failed: {last}")

    def _scores(self, reply: httpx.Response, count: int) -> list[float]:
        try:
            if reply.status_code != 200:
                raise ValueError(f"HTTP {reply.status_code}")
            scores = reply.json()["scores"]
            if len(scores) != count or not all(
                    isinstance(s, (int, float)) and 0 <= s <= 1 for s in scores):
                raise ValueError(f"expected {count} scores in [0, 1]")
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(f"the reward scorer at {self.url} answered badly: {exc}") \
                from None
        return [float(s) for s in scores]


class RewardModel:
    """A process reward model on a second vLLM engine (pooling runner): a sequence classifier
    (e.g. `LlamaForSequenceClassification`) whose last label's probability at a trajectory's
    last token is the trajectory's score (a single label: its sigmoid)."""

    def __init__(self, engine_args) -> None:
        self._engine_args = engine_args
        self._llm = None
        self.tokenizer = None

    async def start(self) -> None:
        """Start its engine; raises ValueError when the model is not a classifier."""
        from vllm.v1.engine.async_llm import AsyncLLM

        self._llm = AsyncLLM.from_engine_args(self._engine_args)
        if self._llm.model_config.runner_type != "pooling":
            self._llm.shutdown()
            raise ValueError(f"--prm {self._engine_args.model}: not a classifier / reward model "
                             "(architecture '...ForSequenceClassification' expected)")
        self.tokenizer = self._llm.get_tokenizer()
        self.max_model_len = self._llm.model_config.max_model_len

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()

    async def score(self, texts: list[str]) -> list[float]:
        """One score in [0, 1] per text, all texts sent to the engine at once."""
        from vllm import PoolingParams
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._llm is None or self._llm.errored:
            raise EngineUnavailable("the reward model's engine is not running")

        async def one(text: str) -> float:
            ids = self.tokenizer.encode(text)[-self.max_model_len:]
            output = None
            async for output in self._llm.encode({"prompt_token_ids": ids},
                                                 PoolingParams(task="classify"),
                                                 request_id=f"steer-prm-{uuid.uuid4().hex}"):
                pass
            return float(output.outputs.data.flatten()[-1])

        try:
            return list(await asyncio.gather(*(one(t) for t in texts)))
        except EngineDeadError as exc:
            raise EngineUnavailable("the reward model's engine died") from exc


def reward_engine_args(path: Path, generator):
    """The reward model's engine: its own folder, the generator's dtype and context, a small KV
    cache on CPU, no stats of its own (they would clash with the generator's metrics); raises
    ValueError when `path` is not a folder."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    from steering.engine.args import CPU_DEFAULT_KV_CACHE_BYTES

    if not Path(path).is_dir():
        raise ValueError(f"--prm {path}: not a local folder")
    args = AsyncEngineArgs(model=str(path), dtype=generator.dtype,
                           max_model_len=generator.max_model_len, disable_log_stats=True,
                           gpu_memory_utilization=0.1 if not current_platform.is_cpu()
                           else generator.gpu_memory_utilization)
    if current_platform.is_cpu():
        args.kv_cache_memory_bytes = CPU_DEFAULT_KV_CACHE_BYTES // 4
    return args
