"""Mirostat v2 (`steering.methods.mirostat`) against a reference run token by token in plain
Python (Basu et al.'s Algorithm 2 as llama.cpp's `mirostat_v2` applies it), through its
processor's batch bookkeeping: rows added, moved, swapped, preempted and re-added, a chunked
prefill's discarded sample. Without an engine."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from steering.methods.mirostat.adapter import MirostatProcessor, decode
from steering.methods.mirostat.core import truncate
from steering.runtime.keys import method_key

VOCAB = 200
CONFIG = SimpleNamespace(additional_config={})


class Reference:
    """One request's mirostat in plain Python floats."""

    def __init__(self, tau: float, eta: float):
        self.tau, self.eta, self.mu = tau, eta, 2 * tau
        self.kept: dict[int, float] = {}  # the last step's renormalised distribution

    def step(self, logits: list[float]) -> set[int]:
        top = max(logits)
        weights = [math.exp(x - top) if x != -math.inf else 0.0 for x in logits]
        total = sum(weights)
        p = [w / total for w in weights]
        kept = [i for i, q in enumerate(p) if q > 0 and -math.log2(q) <= self.mu]
        if not kept:
            kept = [max(range(len(p)), key=p.__getitem__)]
        mass = sum(p[i] for i in kept)
        self.kept = {i: p[i] / mass for i in kept}
        return set(kept)

    def observe(self, token: int) -> None:
        self.mu -= self.eta * (-math.log2(self.kept[token]) - self.tau)


def logits_for(rows: int, generator: torch.Generator) -> torch.Tensor:
    scale = torch.rand(rows, 1, generator=generator) * 4 + 1
    return torch.randn(rows, VOCAB, generator=generator) * scale


def params(tau=5.0, eta=0.1, temperature=1.0, steer_id="r"):
    return SamplingParams(temperature=temperature, extra_args={
        method_key("mirostat"): [tau, eta], "steer_id": steer_id})


class Batch:
    """A processor and the requests in its rows: each step, every row gets logits, the
    processor truncates them, a token is drawn from what it kept and appended to that
    request's output list (as vLLM's sampler and bookkeeping would)."""

    def __init__(self):
        self.proc = MirostatProcessor(CONFIG, torch.device("cpu"), False)
        self.rows: dict[int, str] = {}  # batch row -> request name
        self.outputs: dict[str, list[int]] = {}
        self.refs: dict[str, Reference] = {}
        self.params: dict[str, SamplingParams] = {}
        self.rng = random.Random(0)
        self.generator = torch.Generator().manual_seed(0)

    def add(self, row: int, name: str, tau: float, eta: float, fresh: bool = True) -> None:
        if fresh:
            self.outputs[name], self.refs[name] = [], Reference(tau, eta)
            self.params[name] = params(tau, eta, steer_id=name)
        self.rows[row] = name
        self.proc.update_state(BatchUpdate(batch_size=len(self.rows), removed=[], moved=[],
                                           added=[(row, self.params[name], None,
                                                   self.outputs[name])]))

    def remove(self, row: int) -> None:
        self.rows.pop(row)
        self.proc.update_state(BatchUpdate(batch_size=len(self.rows), removed=[row], added=[],
                                           moved=[]))

    def move(self, a: int, b: int, swap: bool) -> None:
        names = self.rows.pop(a), self.rows.pop(b, None)
        self.rows[b] = names[0]
        if swap:
            self.rows[a] = names[1]
        self.proc.update_state(BatchUpdate(batch_size=len(self.rows), removed=[], added=[],
                                           moved=[(a, b, MoveDirectionality.SWAP if swap
                                                   else MoveDirectionality.UNIDIRECTIONAL)]))

    def step(self, draw: bool = True) -> None:
        size = max(self.rows) + 1
        logits = logits_for(size, self.generator)
        out = self.proc.apply(logits.clone())
        for row, name in self.rows.items():
            ref = self.refs[name]
            assert self.proc._mu[self.proc.rows[row].slot].item() == pytest.approx(
                ref.mu, rel=1e-5, abs=1e-5), name
            want = ref.step(logits[row].tolist())
            assert set(torch.isfinite(out[row]).nonzero().flatten().tolist()) == want, name
            if draw:
                token = self.rng.choice(sorted(want))
                ref.observe(token)
                self.outputs[name].append(token)


def test_mu_follows_the_reference_through_moves_swaps_and_preemption():
    batch = Batch()
    batch.add(0, "a", tau=3.0, eta=0.1)
    batch.add(1, "b", tau=5.0, eta=0.3)
    batch.add(2, "c", tau=1.0, eta=1.0)
    for _ in range(6):
        batch.step()
    batch.move(0, 2, swap=True)
    batch.step()
    batch.remove(1)  # b preempted: it leaves with one token not yet settled
    batch.move(2, 1, swap=False)
    for _ in range(3):
        batch.step()
    batch.add(2, "b", tau=5.0, eta=0.3, fresh=False)  # b comes back with its tokens so far
    for _ in range(6):
        batch.step()
    assert batch.outputs["b"] and len(batch.outputs["b"]) == 13


def test_a_discarded_sample_does_not_move_mu():
    """vLLM samples a chunked prefill's partial steps and discards the tokens: the position
    comes again and only the last sample at it counts."""
    batch = Batch()
    batch.add(0, "a", tau=2.0, eta=0.5)
    batch.step(draw=False)
    batch.step(draw=False)
    for _ in range(4):
        batch.step()


def test_a_new_request_starts_at_twice_tau_and_tau_zero_is_greedy():
    batch = Batch()
    batch.add(0, "a", tau=4.0, eta=0.2)
    batch.step()
    batch.remove(0)
    batch.add(0, "fresh", tau=4.0, eta=0.2)  # a new request on the freed slot
    assert batch.proc._mu[batch.proc.rows[0].slot].item() == 8.0
    logits = logits_for(3, torch.Generator().manual_seed(9))
    keep, _ = truncate(logits, torch.zeros(3))
    assert torch.equal(keep.float().argmax(-1), logits.argmax(-1)) and (keep.sum(-1) == 1).all()


def test_greedy_rows_and_bad_settings_are_left_out():
    proc = MirostatProcessor(CONFIG, torch.device("cpu"), False)
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, params(temperature=0.0), None, []), (1, SamplingParams(), None, [])]))
    assert proc.rows == {}
    for bad in ([-1.0, 0.1], [5.0, float("inf")], ["5", 0.1], [True, 0.1]):
        with pytest.raises(ValueError):
            decode(bad)
