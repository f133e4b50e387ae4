"""DiffAdapt's engine-free core: the labelling rule, default thresholds, the probe (against its
formula), training, the split, and the probe store."""

import math

import pytest
import torch

from steering.artifacts import ArtifactError, ProbeStore
from steering.diffadapt import (
    CLASSES,
    EASY,
    HARD,
    NORMAL,
    DifficultyProbe,
    Thresholds,
    accuracy,
    difficulty_labels,
    held_out_split,
    majority_accuracy,
    thresholds_from_data,
    train_probe,
)


def test_labelling_rule_follows_the_paper():
    t = Thresholds(alpha=0.6, beta=1.0, gamma=0.3)
    acc = torch.tensor([0.9, 0.9, 0.5, 0.1, 0.6, 0.3])
    ent = torch.tensor([0.5, 1.5, 0.5, 0.2, 1.0, 2.0])
    # normal: accurate and confident; easy: accurate but high entropy, or between γ and α;
    # hard: below γ; the boundaries are inclusive for α, β and γ.
    assert difficulty_labels(acc, ent, t).tolist() == [NORMAL, EASY, EASY, HARD, NORMAL, EASY]


def test_hard_wins_when_gamma_exceeds_alpha():
    t = Thresholds(alpha=0.2, beta=5.0, gamma=0.5)
    assert difficulty_labels(torch.tensor([0.3]), torch.tensor([1.0]), t).tolist() == [HARD]


def test_default_thresholds_split_solved_questions_at_their_median_entropy():
    acc = [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    ent = [3.0, 2.0, 1.0, 0.4, 0.8, 0.2, 0.6]
    t = thresholds_from_data(acc, ent, k=4)
    assert t.alpha == t.gamma == 0.5  # median accuracy
    assert t.beta == pytest.approx(0.5)  # median of 0.4, 0.8, 0.2, 0.6
    labels = difficulty_labels(torch.tensor(acc), torch.tensor(ent), t).tolist()
    assert labels == [HARD, HARD, HARD, NORMAL, EASY, NORMAL, EASY]


def test_default_alpha_needs_at_least_one_correct_answer():
    t = thresholds_from_data([0.0, 0.0, 0.0, 0.25], [1.0, 1.0, 1.0, 2.0], k=4)
    assert t.alpha == 0.25 and t.beta == 2.0


def test_probe_is_standardise_then_two_layer_mlp():
    torch.manual_seed(0)
    mean, scale = torch.randn(6), torch.rand(6) + 0.5
    probe = DifficultyProbe(6, 5, mean, scale)
    x = torch.randn(4, 6)
    w1, b1 = probe.net[0].weight, probe.net[0].bias
    w2, b2 = probe.net[2].weight, probe.net[2].bias
    expected = torch.softmax(torch.relu(((x - mean) / scale) @ w1.T + b1) @ w2.T + b2, -1)
    torch.testing.assert_close(probe.probabilities(x), expected)
    assert probe.width == 5 and DifficultyProbe(6, 0).width == 0


def test_probe_round_trips_through_tensors_and_rejects_bad_sets():
    probe = DifficultyProbe(6, 5, torch.randn(6), torch.rand(6) + 0.1)
    again = DifficultyProbe.from_tensors(probe.tensors())
    x = torch.randn(3, 6)
    torch.testing.assert_close(again.probabilities(x), probe.probabilities(x))
    tensors = probe.tensors()
    with pytest.raises(ValueError):
        DifficultyProbe.from_tensors({k: v for k, v in tensors.items() if k != "net.2.bias"})
    with pytest.raises(ValueError):
        DifficultyProbe.from_tensors({**tensors, "net.0.weight": torch.zeros(5, 7)})
    with pytest.raises(ValueError, match="NaN"):
        DifficultyProbe.from_tensors({**tensors, "net.2.bias": torch.tensor([0, math.nan, 0])})
    with pytest.raises(ValueError, match="positive"):
        DifficultyProbe.from_tensors({**tensors, "feature_scale": torch.zeros(6)})


def _clusters(n_per_class: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=g) * 3 + 10  # far from the origin: needs the mean
    x = torch.cat([c + torch.randn(n_per_class, dim, generator=g) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per_class)
    return x, y


@pytest.mark.parametrize("width", [32, 0])
def test_training_separates_clusters(width):
    x, y = _clusters(40)
    train_idx, test_idx = held_out_split(y, 0.25, seed=1)
    probe = train_probe(x[train_idx], y[train_idx], width)
    assert accuracy(probe, x[test_idx], y[test_idx]) >= 0.95


def test_training_is_seeded():
    x, y = _clusters(20)
    a, b = (train_probe(x, y, 8, epochs=3, seed=5) for _ in range(2))
    torch.testing.assert_close(a.tensors(), b.tensors())


def test_split_is_stratified_disjoint_and_complete():
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 4)
    train_idx, test_idx = held_out_split(y, 0.25, seed=3)
    assert set(train_idx.tolist()).isdisjoint(test_idx.tolist())
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(len(y)))
    assert torch.bincount(y[test_idx]).tolist() == [2, 5, 1]


def test_majority_baseline():
    assert majority_accuracy(torch.tensor([2, 2, 1]), torch.tensor([2, 0, 2, 1])) == 0.5


def _probe_tensors(hidden=4):
    return DifficultyProbe(hidden, 3, torch.zeros(hidden), torch.ones(hidden)).tensors()


THRESHOLDS = {"alpha": 0.5, "beta": 1.0, "gamma": 0.5}


def test_probe_store_keeps_probes_across_restarts(tmp_path):
    store = ProbeStore(tmp_path, "m", 4)
    tensors = _probe_tensors()
    meta = store.put("p", tensors, thresholds=THRESHOLDS, metrics={"acc": 0.5})
    assert (meta.width, meta.hidden_size, meta.classes) == (3, 4, list(CLASSES))
    probe, again = ProbeStore(tmp_path, "m", 4).get("p")
    assert again == meta and again.thresholds == THRESHOLDS
    torch.testing.assert_close(probe.tensors(), tensors)


@pytest.mark.parametrize("change, param", [
    ({"tensors": _probe_tensors(5)}, "weights"),
    ({"model": "other"}, "model"),
    ({"thresholds": {"alpha": 0.5}}, "thresholds"),
    ({"thresholds": {"alpha": 0.5, "beta": math.inf, "gamma": 0.5}}, "thresholds"),
    ({"tensors": {"feature_mean": torch.zeros(4)}}, "weights"),
])
def test_probe_store_rejects_mismatches_and_keeps_nothing(tmp_path, change, param):
    store = ProbeStore(tmp_path, "m", 4)
    args = {"tensors": _probe_tensors(), "thresholds": THRESHOLDS, "model": None, **change}
    with pytest.raises(ArtifactError) as info:
        store.put("p", args.pop("tensors"), **args)
    assert info.value.param == param
    assert store.list() == [] and list(tmp_path.glob("*.safetensors")) == []


def test_probe_store_skips_a_corrupt_file(tmp_path):
    ProbeStore(tmp_path, "m", 4).put("good", _probe_tensors(), thresholds=THRESHOLDS)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
    assert [m.name for m in ProbeStore(tmp_path, "m", 4).list()] == ["good"]
