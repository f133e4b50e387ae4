"""DeepConf's quantities against the authors' formulas (facebookresearch/deepconf:
`compute_confidence`, `compute_least_grouped`, `calculate_*_confidence`, the
`np.percentile` threshold and `weighted_majority_vote`, restated here in numpy on recorded
log-probabilities), the answer readers, and the processor's in-batch confidence and cut
through moves, a discarded sample and preemption."""

import math
import random
import time
from collections import defaultdict

import numpy as np
import pytest
import regex
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from steering.methods.deepconf.adapter import DeepConfProcessor, decode
from steering.methods.deepconf.core import (
    Score,
    boxed_answer,
    consensus,
    group_confidences,
    kept,
    last_number,
    regex_answer,
    threshold,
    token_confidence,
    trace_score,
    vote,
    winner,
)
from steering.runtime.keys import method_key
from tests.unit.test_mirostat import CONFIG

VOCAB = 300


# --- the authors' formulas, restated -----------------------------------------------------

def authors_confidence(top_logprobs: list[float]) -> float:
    return -float(np.mean(top_logprobs))


def authors_groups(confs: list[float], size: int) -> list[float]:
    if len(confs) < size:
        return [sum(confs) / len(confs)] if confs else [0]
    return [sum(confs[i:i + size]) / size for i in range(len(confs) - size + 1)]


def authors_bottom(confs: list[float], size: int, bottom: float = 0.1) -> float:
    if len(confs) < size:
        return float(np.mean(confs))
    means = authors_groups(confs, size)
    count = max(1, int(len(means) * bottom))
    return float(np.mean(np.partition(means, count - 1)[:count]))


def authors_vote(answers, weights):
    table = defaultdict(float)
    for a, w in zip(answers, weights):
        table[a] += w
    return max(table.items(), key=lambda x: x[1])[0]


def recorded(tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, VOCAB, generator=generator) * (
        torch.rand(tokens, 1, generator=generator) * 5)
    return torch.log_softmax(logits.double(), -1)


# --- the quantities ------------------------------------------------------------------------

def test_token_confidence_is_minus_the_mean_top_k_logprob_per_row():
    logprobs = recorded(40, 0)
    for k in (1, 5, 20):
        ours = token_confidence(logprobs, k).tolist()  # normalised or not: the same
        for row, value in zip(logprobs, ours):
            top = sorted(row.tolist(), reverse=True)[:k]
            assert value == pytest.approx(authors_confidence(top), rel=1e-12)
    shifted = logprobs + torch.linspace(-3, 5, 40).unsqueeze(1)  # raw logits: any offset per row
    torch.testing.assert_close(token_confidence(shifted, 20), token_confidence(logprobs, 20))
    per_row = torch.tensor([1, 20, 5, 7] * 10)
    ours = token_confidence(logprobs, per_row).tolist()
    for row, k, value in zip(logprobs, per_row.tolist(), ours):
        assert value == pytest.approx(authors_confidence(sorted(row.tolist())[::-1][:k]),
                                      rel=1e-12)


@pytest.mark.parametrize("tokens,window", [(50, 8), (8, 8), (5, 8), (1, 1), (37, 36)])
def test_group_confidences_and_scores_match_the_authors(tokens, window):
    confs = token_confidence(recorded(tokens, tokens), 20).tolist()
    assert group_confidences(confs, window) == pytest.approx(authors_groups(confs, window))
    assert trace_score(confs, Score.MEAN, window) == pytest.approx(np.mean(confs))
    assert trace_score(confs, Score.LOWEST_GROUP, window) == pytest.approx(
        min(authors_groups(confs, window)))
    assert trace_score(confs, Score.BOTTOM_10, window) == pytest.approx(
        authors_bottom(confs, window))
    assert trace_score(confs, Score.TAIL, window) == pytest.approx(np.mean(confs[-window:]))


def test_threshold_is_numpys_percentile_and_the_filter_keeps_the_top():
    rng = random.Random(3)
    for size in (1, 2, 5, 16, 33):
        scores = [rng.uniform(5, 20) for _ in range(size)]
        for keep in (0.1, 0.5, 0.9, 1.0):
            assert threshold(scores, keep) == pytest.approx(
                float(np.percentile(scores, 100 * (1 - keep))), rel=1e-12)
    scores = [float(i) for i in range(1, 11)]
    assert kept(scores, 0.1) == [False] * 9 + [True]
    assert kept(scores, 1.0) == [True] * 10


def test_the_weighted_vote_and_its_consensus():
    rng = random.Random(5)
    for _ in range(200):
        answers = [rng.choice("abcd") for _ in range(rng.randint(1, 12))]
        weights = [rng.uniform(1, 20) for _ in answers]
        table = vote(answers, weights)
        assert winner(table) == authors_vote(answers, weights)
        assert consensus(table) == pytest.approx(max(table.values()) / sum(weights))
    assert vote(["1", None, "1", "2"], [1.0, 9.0, 1.0, 1.5]) == {"1": 2.0, "2": 1.5}
    assert winner({}) is None and consensus({}) == 0.0
    assert winner(vote(["x", "y"], [1.0, 1.0])) == "x"  # the first among equals


def test_answer_readers():
    assert boxed_answer("so \\boxed{\\frac{1}{2}} and \\boxed{42}.") == "42"
    assert boxed_answer("\\boxed{x^{2}}") == "x^{2}" and boxed_answer("\\boxed 7$") == "7"
    assert boxed_answer("no box") is None and boxed_answer("\\boxed{open") is None
    assert last_number("12 + 7 = 19. Answer: 1,234.0") == "1234"
    assert last_number("-3.5 then 2.25") == "2.25" and last_number("none") is None
    assert regex_answer(regex.compile(r"Answer: (\w+)"), "Answer: a ... Answer: b") == "b"
    assert regex_answer(regex.compile(r"\d+"), "1 2 3") == "3"
    assert regex_answer(regex.compile(r"Answer: (\d+)"), "nothing") is None
    slow = regex.compile(r"(x+x+)+y")  # catastrophic backtracking on a long run of x
    started = time.monotonic()
    assert regex_answer(slow, "x" * 5000) is None
    assert time.monotonic() - started < 5


# --- the processor -----------------------------------------------------------------------

EOS = 7


def params(top_k=20, window=4, bar=None, steer_id="r"):
    p = SamplingParams(temperature=1.0, extra_args={
        method_key("deepconf"): [top_k, window, bar], "steer_id": steer_id})
    p.update_from_generation_config({}, eos_token_id=EOS)
    return p


class Batch:
    """The processor and its requests' output lists, stepped as vLLM's sampler would: each
    row draws a token that is not EOS unless the processor left EOS alone."""

    def __init__(self):
        self.proc = DeepConfProcessor(CONFIG, torch.device("cpu"), False)
        self.rows: dict[int, str] = {}
        self.outputs: dict[str, list[int]] = {}
        self.confs: dict[str, list[float]] = defaultdict(list)
        self.params: dict[str, SamplingParams] = {}
        self.generator = torch.Generator().manual_seed(0)

    def add(self, row, name, fresh=True, **settings):
        if fresh:
            self.outputs[name], self.params[name] = [], params(steer_id=name, **settings)
        self.rows[row] = name
        self.proc.update_state(BatchUpdate(batch_size=len(self.rows), removed=[], moved=[],
                                           added=[(row, self.params[name], None,
                                                   self.outputs[name])]))

    def remove(self, row):
        self.rows.pop(row)
        self.proc.update_state(BatchUpdate(batch_size=len(self.rows), removed=[row], added=[],
                                           moved=[]))

    def swap(self, a, b):
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        self.proc.update_state(BatchUpdate(batch_size=len(self.rows), removed=[], added=[],
                                           moved=[(a, b, MoveDirectionality.SWAP)]))

    def step(self, draw=True) -> dict[str, bool]:
        """One step; which rows were cut (only EOS left)."""
        logits = torch.randn(max(self.rows) + 1, VOCAB, generator=self.generator) * 3
        out = self.proc.apply(logits.clone())
        cut = {}
        for row, name in self.rows.items():
            finite = torch.isfinite(out[row]).nonzero().flatten().tolist()
            cut[name] = finite == [EOS]
            if not cut[name]:
                assert torch.equal(out[row], logits[row])  # measured, never changed
            if draw:
                top_k = self.params[name].extra_args[method_key("deepconf")][0]
                self.confs[name].append(authors_confidence(
                    torch.log_softmax(logits[row].double(), -1).topk(top_k).values.tolist()))
                self.outputs[name].append(EOS if cut[name] else 1)
        return cut


def expected_cut(confs: list[float], window: int, bar: float) -> bool:
    return len(confs) >= window and sum(confs[-window:]) / window < bar


def test_a_row_is_cut_at_the_first_full_window_below_its_bar_through_moves():
    batch = Batch()
    batch.add(0, "never", window=3, bar=None)
    batch.add(1, "always", window=4, bar=1e9)
    batch.add(2, "some", window=2, bar=None)
    for step in range(12):
        if step == 3:
            batch.swap(0, 2)
        if step == 5:  # preempted, then back with its tokens so far
            row = next(r for r, n in batch.rows.items() if n == "some")
            batch.remove(row)
            batch.add(row, "some", fresh=False)
            ring = batch.proc._ring[batch.proc.rows[row].slot].tolist()
            assert ring[:2] == pytest.approx(  # its last window, resumed
                [batch.confs["some"][4], batch.confs["some"][3]], rel=1e-5)
        cut = batch.step()
        assert not cut["never"] and not cut["some"]
        assert cut.get("always", False) == (step == 3)
        if step == 3:
            batch.remove(next(r for r, n in batch.rows.items() if n == "always"))
    slot_of = {n: batch.proc.rows[r].slot for r, n in batch.rows.items()}
    for name, window in (("never", 3), ("some", 2)):
        ring = batch.proc._ring[slot_of[name]].tolist()
        confs = batch.confs[name]
        for position in range(len(confs) - window, len(confs)):
            assert ring[position % window] == pytest.approx(confs[position], rel=1e-5)


def test_the_bar_is_compared_with_the_windows_mean():
    """A bar between two rows' group confidences cuts the one below it, at its window."""
    batch = Batch()
    batch.add(0, "probe", window=3)
    for _ in range(3):
        batch.step()
    mean = sum(batch.confs["probe"]) / 3
    for bar, cuts in ((mean + 1e-3, True), (mean - 1e-3, False)):
        again = Batch()
        again.add(0, "row", window=3, bar=bar)
        again.step(), again.step()
        assert again.step()["row"] is cuts
        assert expected_cut(again.confs["row"], 3, bar) is cuts


def test_a_discarded_sample_is_measured_again_at_the_same_position():
    batch = Batch()
    batch.add(0, "r", window=2, bar=1e9)
    assert batch.step(draw=False) == {"r": False}  # a chunked prefill's partial step
    assert batch.step() == {"r": False}  # position 0 again, the window not full
    assert batch.step() == {"r": True}


def test_bad_settings_are_refused():
    for encoded in ([0, 4, None], [20, 0, None], [20, 4097, None], [20, 4, float("nan")],
                    [True, 4, None], [20, 4, "1"]):
        with pytest.raises(ValueError):
            decode(encoded)
    assert decode([20, 4, None]) == (20, 4, -math.inf)
