"""DiffAdapt's engine-free core: the labelling rule, default thresholds, the probe (against its
formula), training, the split, and the probe store."""

import math
from dataclasses import replace

import pytest
import torch

from steering.artifacts import ArtifactError, ProbeStore, read_artifact, write_artifact
from steering.framing import Framing
from steering.methods.diffadapt.core import (
    CLASSES,
    EASY,
    HARD,
    NORMAL,
    PAPER_THRESHOLDS,
    PAPER_TRAINING,
    RECIPES,
    VARIANT_TRAINING,
    DifficultyProbe,
    Recipe,
    Thresholds,
    accuracy,
    difficulty_labels,
    has_think_tags,
    held_out_split,
    macro_f1,
    majority_accuracy,
    thresholds_from_data,
    top_logprob_entropy,
    train_probe,
)

VARIANT = Recipe.VARIANT


def test_labelling_rule_follows_the_paper():
    t = Thresholds(alpha=0.6, beta=1.0, gamma=0.3)
    acc = torch.tensor([0.9, 0.9, 0.5, 0.1, 0.6, 0.3])
    ent = torch.tensor([0.5, 1.5, 0.5, 0.2, 1.0, 2.0])
    # normal: accurate and confident; easy: accurate but high entropy, or between γ and α;
    # hard: below γ; the boundaries are inclusive for α, β and γ.
    assert difficulty_labels(acc, ent, t, VARIANT).tolist() == [
        NORMAL, EASY, EASY, HARD, NORMAL, EASY]


def test_hard_wins_when_gamma_exceeds_alpha():
    t = Thresholds(alpha=0.2, beta=5.0, gamma=0.5)
    labels = difficulty_labels(torch.tensor([0.3]), torch.tensor([1.0]), t, VARIANT)
    assert labels.tolist() == [HARD]


def test_default_thresholds_split_solved_questions_at_their_median_entropy():
    acc = [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    ent = [3.0, 2.0, 1.0, 0.4, 0.8, 0.2, 0.6]
    t = thresholds_from_data(acc, ent, k=4)
    assert t.alpha == t.gamma == 0.5  # median accuracy
    assert t.beta == pytest.approx(0.5)  # median of 0.4, 0.8, 0.2, 0.6
    labels = difficulty_labels(torch.tensor(acc), torch.tensor(ent), t, VARIANT).tolist()
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
    probe, _ = train_probe(x[train_idx], y[train_idx], replace(VARIANT_TRAINING, width=width))
    assert accuracy(probe, x[test_idx], y[test_idx]) >= 0.95


def test_training_is_seeded():
    x, y = _clusters(20)
    a, b = (train_probe(x, y, replace(PAPER_TRAINING, width=8, epochs=3), seed=5)[0]
            for _ in range(2))
    torch.testing.assert_close(a.tensors(), b.tensors())


def test_paper_labels_follow_the_authors_rule():
    """Their code, in order: acc > 0.85 and H < 0.35 → Normal; elif acc < 0.6 → Hard; else
    Easy (strict at every boundary)."""
    acc = torch.tensor([0.9, 0.85, 0.9, 0.9, 0.6, 0.59, 1.0, 0.0, 0.7])
    ent = torch.tensor([0.2, 0.2, 0.35, 0.5, 0.1, 0.1, 0.0, 0.0, 2.0])
    want = [NORMAL, EASY, EASY, EASY, EASY, HARD, NORMAL, HARD, EASY]
    assert difficulty_labels(acc, ent, PAPER_THRESHOLDS, Recipe.PAPER).tolist() == want
    assert (PAPER_THRESHOLDS.alpha, PAPER_THRESHOLDS.beta, PAPER_THRESHOLDS.gamma) == (
        0.85, 0.35, 0.6)


def test_top_logprob_entropy_renormalises_the_listed_tokens():
    logprobs = [[-0.1, -2.5, -3.0, -7.0], [-0.01, -5.0, -math.inf, -math.inf]]
    for row, got in zip(logprobs, top_logprob_entropy(torch.tensor(logprobs)).tolist()):
        listed = [math.exp(x) for x in row if x > -math.inf]
        p = [x / sum(listed) for x in listed]
        assert got == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-9)


def test_macro_f1_against_its_definition():
    predicted = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    labels = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    # per class: 0: tp 1, fp 1, fn 1 → 0.5; 1: tp 2, fp 0, fn 1 → 0.8; 2: tp 2, fp 1, fn 0 → 0.8
    assert macro_f1(predicted, labels) == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    # a class in neither is left out (scikit-learn's labels=None)
    assert macro_f1(torch.tensor([1, 1]), torch.tensor([1, 2])) == pytest.approx((2 / 3) / 2)


def test_paper_training_keeps_the_best_validation_macro_f1():
    """The authors' split (a seeded permutation's first 20%) and selection: the weights kept
    score, on that split, the first maximum of the epochs' scores, and are not standardised."""
    x, y = _clusters(30, seed=4)
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(9)) * 6  # overlap
    training = replace(PAPER_TRAINING, width=16, epochs=15)
    chosen, scores = train_probe(x, y, training, seed=4)
    check = torch.randperm(len(y), generator=torch.Generator().manual_seed(4))[:18]
    assert len(scores) == 15 and scores[-1] < max(scores)  # the choice mattered: not the last
    assert macro_f1(chosen.probabilities(x[check]).argmax(-1), y[check]) == max(scores)
    last, _ = train_probe(x, y, training, seed=4)  # seeded: the same run again
    torch.testing.assert_close(last.tensors(), chosen.tensors())
    assert (chosen.feature_mean == 0).all() and (chosen.feature_scale == 1).all()
    assert chosen.width == 16 and PAPER_TRAINING.width == 512 and PAPER_TRAINING.cosine


def test_variant_training_keeps_the_last_epoch():
    x, y = _clusters(10)
    probe, scores = train_probe(x, y, replace(VARIANT_TRAINING, epochs=2))
    assert scores == [] and not (probe.feature_mean == 0).all()


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
    ({"recipe": "guess"}, "recipe"),
])
def test_probe_store_rejects_mismatches_and_keeps_nothing(tmp_path, change, param):
    store = ProbeStore(tmp_path, "m", 4)
    args = {"tensors": _probe_tensors(), "thresholds": THRESHOLDS, "model": None, **change}
    with pytest.raises(ArtifactError) as info:
        store.put("p", args.pop("tensors"), **args)
    assert info.value.param == param
    assert store.list() == [] and list(tmp_path.glob("*.safetensors")) == []


def test_probe_store_keeps_the_recipe_and_reads_older_files_as_the_variant(tmp_path):
    store = ProbeStore(tmp_path, "m", 4)
    assert store.put("p", _probe_tensors(), thresholds=THRESHOLDS, recipe="paper").recipe == \
        "paper"
    assert ProbeStore(tmp_path, "m", 4).get("p")[1].recipe == "paper"
    tensors, meta = read_artifact(tmp_path / "p.safetensors")
    del meta["recipe"]  # as written before recipes existed
    write_artifact(tmp_path / "p.safetensors", tensors, meta)
    assert ProbeStore(tmp_path, "m", 4).get("p")[1].recipe == "variant"


def test_probe_store_skips_a_corrupt_file(tmp_path):
    ProbeStore(tmp_path, "m", 4).put("good", _probe_tensors(), thresholds=THRESHOLDS)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
    assert [m.name for m in ProbeStore(tmp_path, "m", 4).list()] == ["good"]


def test_paper_texts_are_the_authors():
    """The strings of Dominic789654/Probe_new (its '\\b' of '\\boxed' is a backspace there, a
    typo: the intended text is used), and each class's sampling."""
    paper = RECIPES[Recipe.PAPER]
    suffix = "\n\nLet's reason step by step, and put your final answer within \\boxed{}."
    assert paper.probe_framing.wrap("Q") == "Q" + suffix and not paper.probe_framing.system
    assert paper.probe_framing.prefill.startswith("<think>\n\nI need to analyze the difficulty")
    assert paper.probe_framing.prefill.endswith("I think the difficulty of this question is")
    easy, normal, hard = (paper.strategies[c] for c in CLASSES)
    assert {s.prompt for s in (easy, normal, hard)} == {"{question}" + suffix}
    assert easy.prefill.endswith("double-checking my approach.</think>")
    assert normal.prefill == ("<think>\nI'll break this down into clear, logical steps and solve "
                              "methodically.")
    assert [(s.temperature, s.top_p, s.budget) for s in (easy, normal, hard)] == [
        (0.5, 1.0, 0.4), (0.8, 0.95, 1.0), (0.4, 1.0, 0.5)]
    assert easy.system.startswith("You are a helpful and harmless assistant.")
    labelling = paper.labelling
    assert labelling.framing.wrap("Q") == ("Q\nPlease reason step by step, and put your final "
                                           "answer within \\boxed{}.")
    assert (labelling.framing.prefill, labelling.samples, labelling.temperature,
            labelling.top_p, labelling.top_logprobs) == ("<think>\n", 10, 0.6, 0.95, 10)


def test_a_model_without_think_tags_gets_the_texts_without_them():
    easy = RECIPES[Recipe.PAPER].strategies["easy"]
    assert easy.for_model(True) is easy
    assert easy.for_model(False).prefill == ("This looks straightforward. Let me solve it "
                                             "directly while double-checking my approach.")
    probe = RECIPES[Recipe.PAPER].probe_framing.for_model(False)
    assert probe.prefill.startswith("I need to analyze")
    assert RECIPES[Recipe.PAPER].labelling.framing.for_model(False).prefill == ""
    assert Framing(prefill="<think>\nx").for_model(False).prompt == "{question}"
    assert has_think_tags(1, 1) and not has_think_tags(3, 4) and not has_think_tags(1, 3)


def test_a_samples_entropy_is_over_its_tokens_top_logprobs_and_the_sampled_one():
    """The authors' labelling entropy from an OpenAI logprobs body: a sampled token outside
    the listed top ones joins them; the sample's entropy is the mean over its tokens."""
    from clients.cli.probes import _choice_entropy

    def entry(token, logprob, top):
        return {"token": token, "logprob": logprob,
                "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}

    choice = {"logprobs": {"content": [
        entry("a", -0.2, [("a", -0.2), ("b", -1.9)]),
        entry("z", -4.0, [("x", -0.1), ("y", -2.5)])]}}
    rows = [[-0.2, -1.9], [-0.1, -2.5, -4.0]]

    def h(row):
        p = [math.exp(x) / sum(math.exp(y) for y in row) for x in row]
        return -sum(q * math.log(q) for q in p)

    assert _choice_entropy(choice, 2) == pytest.approx((h(rows[0]) + h(rows[1])) / 2)
    assert _choice_entropy({"steering": {"entropy": {"mean": 1.5}}}, 0) == 1.5
