"""DeepConf's quantities, engine-free (Fu et al. 2025, arXiv 2508.15260, §2–3), on token
log-probabilities and per-token confidences. The in-engine adapter computes `token_confidence`
and the sliding group confidence for every row at once; everything else runs on a trace's
recorded confidences when it ends."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from enum import StrEnum

import regex
import torch

BOTTOM_FRACTION = 0.1  # "bottom 10% group confidence" (paper §3.1)
REGEX_TIMEOUT_S = 0.05  # a user's pattern gets this long per trace, then the trace has no answer


class Score(StrEnum):
    """How an offline trace is scored (paper §3.1; authors' `analysis_offline.py`)."""

    MEAN = "mean"  # average trace confidence: mean of C_i over the trace
    LOWEST_GROUP = "lowest_group"  # lowest group confidence: min over the sliding windows
    BOTTOM_10 = "bottom_10"  # mean of the lowest 10% of the sliding windows
    TAIL = "tail"  # mean of C_i over the trace's last `window` tokens


def token_confidence(logits: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Token confidence C_i = −(1/k) Σ_{j≤k} log P_i(j) over the k most likely tokens of each
    row's distribution (paper eq. 2), from `logits` (rows, vocab); `k`: one per row (a
    tensor) or for all. (A fused log-softmax then the top-k is faster on CPU than a top-k of
    the logits less their log-sum-exp.)"""
    k_max = int(k) if isinstance(k, int) else int(k.max())
    top = torch.log_softmax(logits, -1).topk(k_max, dim=-1).values
    if isinstance(k, int):
        return -top.mean(-1)
    keep = torch.arange(k_max, device=top.device) < k.unsqueeze(-1)
    return -(top * keep).sum(-1) / k.to(top.dtype)


def group_confidences(confidences: Sequence[float], window: int) -> list[float]:
    """Group confidence C_G over each sliding window of `window` tokens (paper eq. 3), the
    authors' `compute_least_grouped`: a trace shorter than a window is one group."""
    if len(confidences) < window:
        return [sum(confidences) / len(confidences)] if confidences else []
    total = sum(confidences[:window])
    groups = [total / window]
    for i in range(window, len(confidences)):
        total += confidences[i] - confidences[i - window]
        groups.append(total / window)
    return groups


def trace_score(confidences: Sequence[float], score: Score, window: int) -> float:
    """A trace's confidence (paper §3.1: eqs. 4–7); 0 for a trace with no tokens."""
    if not confidences:
        return 0.0
    if score == Score.MEAN:
        return sum(confidences) / len(confidences)
    if score == Score.TAIL:
        tail = confidences[-window:]
        return sum(tail) / len(tail)
    groups = group_confidences(confidences, window)
    if score == Score.LOWEST_GROUP:
        return min(groups)
    bottom = sorted(groups)[:max(1, int(len(groups) * BOTTOM_FRACTION))]
    return sum(bottom) / len(bottom)


def threshold(scores: Sequence[float], keep: float) -> float:
    """The stopping threshold s: the (1 − η) percentile of the warm-up traces' scores (paper
    eq. 9; the authors' `np.percentile(min_confs, 100 − percentile)` with linear
    interpolation), so that about a fraction η of traces like them stay above it."""
    return torch.quantile(torch.tensor(list(scores), dtype=torch.float64), 1.0 - keep).item()


def kept(scores: Sequence[float], keep: float) -> list[bool]:
    """Offline filtering (paper §3.2): the traces at or above the (1 − η) percentile."""
    bar = threshold(scores, keep)
    return [s >= bar for s in scores]


def vote(answers: Sequence[str | None], weights: Sequence[float]) -> dict[str, float]:
    """The vote table of a confidence-weighted majority vote (paper eq. 8): each answer's
    total weight, in order of first appearance; traces without an answer do not vote."""
    table: dict[str, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            table[answer] = table.get(answer, 0.0) + weight
    return table


def winner(table: dict[str, float]) -> str | None:
    """The answer with the most weight (the first to appear among equals)."""
    return max(table, key=table.__getitem__) if table else None


def consensus(table: dict[str, float]) -> float:
    """The leader's share of the vote, β (paper Algorithm 2: stop sampling once β ≥ τ)."""
    total = sum(table.values())
    return max(table.values()) / total if total > 0 else 0.0


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def boxed_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), as math answers are written."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    rest = text[start + len("\\boxed"):].lstrip()
    if not rest.startswith("{"):
        match = re.match(r"\s*([^\s$]+)", rest)
        return match.group(1) if match else None
    depth = 0
    for i, char in enumerate(rest):
        depth += char == "{"
        depth -= char == "}"
        if depth == 0:
            return rest[1:i].strip() or None
    return None


def last_number(text: str) -> str | None:
    """The last number in the text, without thousands separators or a trailing `.0`."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    if "." in value:
        number = float(value)
        if math.isfinite(number) and number == int(number):
            return str(int(number))
    return value


def regex_answer(pattern: regex.Pattern, text: str) -> str | None:
    """The last match of a user's pattern: its first group if it has one, else the match.
    A pattern that backtracks past `REGEX_TIMEOUT_S` finds nothing (the event loop runs it)."""
    found = None
    try:
        for found in pattern.finditer(text, timeout=REGEX_TIMEOUT_S):
            pass
    except TimeoutError:
        return None
    if found is None:
        return None
    value = found.group(1) if pattern.groups else found.group(0)
    return value.strip() or None
