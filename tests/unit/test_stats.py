"""The bootstrap intervals of the results tables, against the normal approximation and exact
cases."""

import math

import numpy as np
import pytest

from clients.experiments.stats import interval_text, mean_interval, paired_difference


def test_mean_interval_matches_the_normal_approximation_on_a_large_sample():
    x = np.random.default_rng(1).exponential(2.0, size=2000)
    mean, low, high = mean_interval(x)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(len(x))
    assert mean == pytest.approx(x.mean())
    assert low == pytest.approx(mean - half, abs=0.1 * half)
    assert high == pytest.approx(mean + half, abs=0.1 * half)


def test_nans_are_left_out_and_pairs_stay_together():
    assert mean_interval([1.0, float("nan"), 3.0])[0] == 2.0
    assert all(math.isnan(v) for v in mean_interval([float("nan")]))
    control = np.random.default_rng(2).normal(0, 5, size=50)  # widely spread units
    assert paired_difference(control + 0.25, control) == pytest.approx((0.25, 0.25, 0.25))
    # a pair with one side undefined drops out
    assert paired_difference([1.0, float("nan")], [0.5, 2.0]) == (0.5, 0.5, 0.5)
    assert interval_text((0.5, 0.25, 0.75), 2) == "0.50 [0.25, 0.75]"
