"""Intervals for the results tables in docs/: percentile bootstrap over the evaluation's units
(prompts, problems), so a difference between two rows can be read against its noise."""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000


def mean_interval(values, level: float = LEVEL, resamples: int = RESAMPLES,
                  seed: int = 0) -> tuple[float, float, float]:
    """The mean of `values` (NaNs left out) and its percentile-bootstrap interval."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[draws].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(low), float(high)


def paired_difference(treated, control, level: float = LEVEL, resamples: int = RESAMPLES,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of treated − control over the units where both are defined, with its interval
    (resampling units keeps each pair together, so what the units share cancels)."""
    return mean_interval(np.asarray(treated, dtype=float) - np.asarray(control, dtype=float),
                         level, resamples, seed)


def interval_text(estimate: tuple[float, float, float], digits: int = 3) -> str:
    mean, low, high = estimate
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
