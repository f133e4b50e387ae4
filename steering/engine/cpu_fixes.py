"""A fix for vLLM 0.32's CPU runner, applied in engines started by entropy-steer.

With chunked prefill, a request whose prompt is split over several steps still gets a token
sampled in its partial steps, which vLLM discards; for a seeded request it then rewinds the
request's random generator by `Generator.set_offset`, which only CUDA generators have. On the
CPU the call raises and kills the engine: any seeded request whose prompt gets chunked (long
prompts, or many concurrent requests) took the server down. Here the generator states of the
rows to be discarded are saved before sampling and restored after it, which rewinds exactly,
and vLLM's own rewind skips those rows.
"""

from __future__ import annotations

import functools

import numpy as np


def install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._sample, "_entropy_steer", False):
        return
    sample, bookkeeping = GPUModelRunner._sample, GPUModelRunner._bookkeeping_sync

    @functools.wraps(sample)
    def _sample(self, *args, **kwargs):
        batch = self.input_batch
        discarded = np.nonzero(self.discard_request_mask.np[: batch.num_reqs])[0]
        saved = {}
        for row in discarded.tolist():
            generator = batch.generators.get(row)
            if generator is not None and generator.device.type == "cpu":
                saved[row] = generator.get_state()
        output = sample(self, *args, **kwargs)
        for row, state in saved.items():
            batch.generators[row].set_state(state)
        self._steer_rewound = list(saved)
        return output

    @functools.wraps(bookkeeping)
    def _bookkeeping_sync(self, *args, **kwargs):
        generators = self.input_batch.generators
        rewound = {row: generators.pop(row) for row in getattr(self, "_steer_rewound", ())}
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(rewound)
            self._steer_rewound = []

    _sample._entropy_steer = True
    GPUModelRunner._sample = _sample
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync
