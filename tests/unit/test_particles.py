"""The particle filter's core against the formulas in its docstring (Puri et al.; ePF)."""

import asyncio
import math

import pytest
import torch

from steering.methods.particles.core import (
    ParticleFilter,
    ParticleSettings,
    Step,
    annealing_temperature,
    effective_sample_size,
    log_odds,
    resample,
    self_certainty,
)


def test_log_odds_clips_scores():
    w = log_odds(torch.tensor([0.5, 0.9, 0.0, 1.0]))
    assert w[0] == 0 and w[1] == pytest.approx(math.log(9))
    assert w[2] == pytest.approx(math.log(1e-7 / (1 - 1e-7)))
    assert w[3] == pytest.approx(-w[2])


def test_effective_sample_size():
    assert effective_sample_size(torch.zeros(8)) == pytest.approx(8)
    assert effective_sample_size(torch.tensor([0.0, -1e4, -1e4])) == pytest.approx(1)
    w = torch.tensor([1.0, 2.0, 3.0])
    p = torch.softmax(w, 0)
    assert effective_sample_size(w) == pytest.approx(float(1 / (p**2).sum()))


# Weights with ESS/N = 0.25 (one dominant of four): p ≈ (1, 0, 0, 0) gives ratio 0.25.
DOMINANT = torch.tensor([0.0, -50.0, -50.0, -50.0])


@pytest.mark.parametrize("step, expected", [(1, (1 / 0.25) * (1 - 1 / 10)), (4, 4 * 0.6),
                                            (5, 1.0), (9, 1.0)])
def test_ess_rule(step, expected):
    assert annealing_temperature(DOMINANT, step, 10, "ess", 0.5, 0.5) == pytest.approx(expected)


def test_entropy_rule():
    w = torch.tensor([2.0, 0.0, -1.0, -3.0])
    p = torch.softmax(w.double(), 0)
    ratio = float(1 / (p**2).sum()) / 4
    assert ratio < 0.5
    h = float(-(p * p.log()).sum()) / math.log(4)
    progress = 2 / 10
    beta = h + (1 - h) * progress
    assert annealing_temperature(w, 2, 10, "entropy", 0.5, 0.5) == pytest.approx(
        max(1.0, 1 / beta))


def test_base_rule_and_none():
    assert annealing_temperature(DOMINANT, 3, 10, "base", 0.5, 0.5) == pytest.approx(1.7)
    assert annealing_temperature(DOMINANT, 1, 10, "none", 0.5, 0.5) == 1.0


def test_no_annealing_when_ess_is_high_or_late():
    assert annealing_temperature(torch.zeros(4), 1, 10, "ess", 0.5, 0.5) == 1.0
    assert annealing_temperature(DOMINANT, 5, 10, "base", 0.5, 0.5) == 1.0


@pytest.mark.parametrize("scheme", ["systematic", "multinomial"])
def test_resampling_frequencies_match_probabilities(scheme):
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    rounds = 4000
    for _ in range(rounds):
        counts += torch.bincount(resample(p, 8, scheme, g), minlength=4)
    freq = counts / (rounds * 8)
    assert torch.allclose(freq, p.double().float(), atol=0.01)


def test_systematic_resampling_is_low_variance():
    """Systematic resampling gives each particle floor(N p) or ceil(N p) copies."""
    p = torch.tensor([0.55, 0.3, 0.15])
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        counts = torch.bincount(resample(p, 8, "systematic", g), minlength=3).tolist()
        for c, expected in zip(counts, (p * 8).tolist()):
            assert math.floor(expected) <= c <= math.ceil(expected)


def test_self_certainty():
    assert self_certainty([0.0, 0.0]) == 1.0
    assert self_certainty([1.0, 3.0, None]) == pytest.approx(math.exp(-2))


class World:
    """Scripted steps: particle text grows by a letter; 'z' ends it. The reward is the share
    of 'a' in the text, so the filter should keep 'a'-rich particles."""

    def __init__(self, letters: str, seed: int = 0):
        self.letters = letters
        self.g = torch.Generator().manual_seed(seed)
        self.batches: list[int] = []

    async def extend(self, particles):
        self.batches.append(len(particles))
        steps = []
        for _ in particles:
            letter = self.letters[int(torch.randint(len(self.letters), (), generator=self.g))]
            steps.append(Step(text=letter, token_ids=[ord(letter)], entropy=[1.0],
                              varentropy=[0.5], finished=letter == "z"))
        return steps

    async def score(self, particles):
        return [p.text.count("a") / max(1, len(p.text)) for p in particles]


def run(settings, world, seed=0):
    return asyncio.run(ParticleFilter(settings, seed=seed).run(world.extend, world.score))


def test_filter_steps_resamples_and_selects_argmax():
    world = World("ab")
    chosen, particles, reports = run(ParticleSettings(n=8, max_steps=6), world)
    assert len(particles) == 8 and len(reports) == 6
    assert world.batches == [8] * 6  # every live particle, one batch per step
    assert all(p.finished for p in particles)  # max_steps finishes them
    assert chosen.log_weight == max(p.log_weight for p in particles)
    assert chosen.text.count("a") / len(chosen.text) >= 0.8  # selection pressure works
    assert [r.step for r in reports] == list(range(1, 7))


def test_finished_particles_keep_weight_and_stop_growing():
    world = World("azz")
    chosen, particles, reports = run(ParticleSettings(n=6, max_steps=10), world)
    for p in particles:
        assert p.finished
        assert "z" not in p.text[:-1] and (p.text.endswith("z") or len(p.steps) == 10)
        s = p.text.count("a") / len(p.text)
        assert p.log_weight == pytest.approx(float(log_odds(torch.tensor([s]))[0]))
    # each step extends exactly the particles still live then
    assert world.batches == [r.live for r in reports]
    assert world.batches[0] == 6 and min(world.batches) < 6


def test_weights_are_not_cumulative():
    world = World("ab")
    _, particles, _ = run(ParticleSettings(n=4, max_steps=3), world)
    for p in particles:  # the weight is the latest score's log-odds only
        s = p.text.count("a") / len(p.text)
        assert p.log_weight == pytest.approx(float(log_odds(torch.tensor([s]))[0]))


def test_lookahead_generates_and_scores_successors_without_keeping_them():
    world = World("ab")
    _, particles, reports = run(ParticleSettings(n=4, max_steps=3, lookahead=True), world)
    assert world.batches[:2] == [4, 4]  # step, then look-ahead of the same particles
    assert all(len(p.steps) == 3 for p in particles)  # successors were discarded


def test_seeded_runs_repeat():
    a = run(ParticleSettings(n=4, max_steps=4, select="sample"), World("ab", 3), seed=9)
    b = run(ParticleSettings(n=4, max_steps=4, select="sample"), World("ab", 3), seed=9)
    assert a[0].text == b[0].text and [p.text for p in a[1]] == [p.text for p in b[1]]


def test_step_reports_carry_weights_and_ancestors():
    """Each report's weights are softmax of the particles' log-odds scores before resampling,
    and its ancestors say which scored particle each new one copies: the next step extends
    exactly those texts."""
    world = World("ab")
    scored: list[tuple[list[str], list[float]]] = []
    extended: list[list[str]] = []

    async def extend(particles):
        extended.append([p.text for p in particles])
        return await world.extend(particles)

    async def score(particles):
        scores = await world.score(particles)
        scored.append(([p.text for p in particles], scores))
        return scores

    reports: list = []

    async def observe(report):
        reports.append(report)

    filt = ParticleFilter(ParticleSettings(n=6, max_steps=4), seed=3, on_step=observe)
    asyncio.run(filt.run(extend, score))
    assert len(reports) == 4
    for step, report in enumerate(reports):
        texts, scores = scored[step]
        expected = torch.softmax(log_odds(torch.tensor(scores, dtype=torch.float64)), 0)
        assert report.weights == pytest.approx(expected.tolist())
        if step + 1 < len(reports):  # the last step finishes every particle: no resampling
            assert report.resampled and len(report.ancestors) == 6
            assert extended[step + 1] == [texts[i] for i in report.ancestors]
            assert report.distinct_ancestors == len(set(report.ancestors))
        else:
            assert not report.resampled and report.ancestors == []
