"""DiffAdapt (arXiv 2510.19669): a difficulty probe on a prompt's final hidden state picks an
Easy / Normal / Hard inference strategy. Engine-free: labels, the probe, its training, the
strategy tables, and the two recipes.

Self-labelling (paper §3): sample k answers per training question with the served model; with
mean accuracy `a` and mean token entropy `h`, a question is Normal when it is solved with low
entropy, Hard when it is rarely solved, Easy otherwise (solved, but with high entropy: the
"overthinking" arm of the U-shape). The probe is a 2-layer MLP over the last-layer hidden state
(after the final norm), trained with cross-entropy and AdamW (lr 1e-3, 100 epochs).

Two recipes (`Recipe`):

- **paper**: what the first author's code (GitHub Dominic789654/Probe_new) does. Thresholds
  α, β, γ = 0.85, 0.35, 0.6 on an entropy over each token's top-10 log-probs renormalised; the
  probe reads the hidden state after a difficulty-eliciting assistant prefill; width 512, no
  input standardisation, cosine schedule, the checkpoint with the best validation macro-F1;
  strategies are assistant-side prefills after a system prompt (Easy closes thinking at once),
  Normal samples with top-p 0.95; an answer cut off by its budget is continued after a forced
  final-answer prefix (`Continuation`).
- **variant**: this project's reading from the paper's text alone, kept for comparison:
  thresholds from the data, the probe at the question's last token, standardised inputs, width
  256, instruction-wrapped questions.

A model without `<think>` / `</think>` tokens (the bundled SmolLM2) gets the paper's texts with
the tags removed (`Framing.for_model`): its chat template has no thinking section to open.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from steering.framing import Continuation, Framing

CLASSES = ("easy", "normal", "hard")
EASY, NORMAL, HARD = range(3)


class Recipe(str, Enum):
    """Whose DiffAdapt a probe was made and is served by (stored in the probe's metadata)."""

    PAPER = "paper"
    VARIANT = "variant"


@dataclass(frozen=True)
class Thresholds:
    """α: accuracy a Normal question needs; β: entropy it may not exceed; γ: below this
    accuracy a question is Hard."""

    alpha: float
    beta: float
    gamma: float


PAPER_THRESHOLDS = Thresholds(alpha=0.85, beta=0.35, gamma=0.6)


def difficulty_labels(accuracy: torch.Tensor, entropy: torch.Tensor, thresholds: Thresholds,
                      recipe: Recipe) -> torch.Tensor:
    """Class index per question (0 easy, 1 normal, 2 hard).

    paper (the authors' code, in its order): Normal if a > α and h < β, else Hard if a < γ,
    else Easy. variant: Normal if a ≥ α and h ≤ β, Hard if a < γ (Hard wins when γ > α)."""
    labels = torch.full(accuracy.shape, EASY, dtype=torch.long)
    if recipe is Recipe.PAPER:
        normal = (accuracy > thresholds.alpha) & (entropy < thresholds.beta)
        labels[~normal & (accuracy < thresholds.gamma)] = HARD
        labels[normal] = NORMAL
    else:
        labels[(accuracy >= thresholds.alpha) & (entropy <= thresholds.beta)] = NORMAL
        labels[accuracy < thresholds.gamma] = HARD
    return labels


def thresholds_from_data(accuracy: list[float], entropy: list[float], k: int) -> Thresholds:
    """The variant's thresholds: α = γ = the median accuracy (at least one correct answer in
    k), β = the median entropy of the questions at or above it. Solved questions split into
    confident (Normal) and high-entropy (Easy) halves; the rest are Hard."""
    alpha = max(statistics.median(accuracy), 1.0 / k)
    solved = [h for a, h in zip(accuracy, entropy) if a >= alpha]
    beta = statistics.median(solved) if solved else max(entropy)
    return Thresholds(alpha=alpha, beta=beta, gamma=alpha)


def top_logprob_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row's distribution renormalised over the log-probs it lists:
    the authors' labelling entropy over a token's top 10 (plus the sampled token when it is
    not among them). -inf pads a shorter row."""
    log_p = torch.log_softmax(logprobs.double(), dim=-1)
    return -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)


class DifficultyProbe(nn.Module):
    """Standardise (the variant; the paper's probe keeps mean 0 and scale 1), then MLP
    (`width` > 0: Linear-ReLU-Linear, the paper's probe) or a linear head (`width` 0, the
    paper's ablation); logits over CLASSES."""

    def __init__(self, hidden_size: int, width: int, mean: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(hidden_size) if mean is None else mean)
        self.register_buffer("feature_scale", torch.ones(hidden_size) if scale is None else scale)
        if width:
            self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(),
                                     nn.Linear(width, len(CLASSES)))
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, len(CLASSES)))

    @property
    def hidden_size(self) -> int:
        return self.feature_mean.numel()

    @property
    def width(self) -> int:
        return self.net[0].out_features if len(self.net) > 1 else 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.feature_mean) / self.feature_scale)

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(features.float()), dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().float().contiguous() for name, t in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> DifficultyProbe:
        """Rebuild from `tensors()`; raises ValueError on a malformed set."""
        try:
            hidden = tensors["feature_mean"].numel()
            width = tensors["net.0.weight"].shape[0] if "net.2.weight" in tensors else 0
            probe = cls(hidden, width)
            probe.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
        except (KeyError, RuntimeError, AttributeError, IndexError) as exc:
            raise ValueError(f"not a difficulty probe: {exc}") from None
        if not all(bool(torch.isfinite(t).all()) for t in probe.state_dict().values()):
            raise ValueError("the probe has NaN or infinite weights")
        if not bool((probe.feature_scale > 0).all()):
            raise ValueError("feature_scale must be positive")
        return probe.eval()


@dataclass(frozen=True)
class Training:
    """How a probe is fitted. `validation` > 0 holds out that share of the training questions
    (a seeded permutation's first part, as the authors split) and keeps the epoch with the best
    validation macro-F1 (a strict improvement replaces it); 0 keeps the last epoch."""

    width: int
    standardise: bool
    cosine: bool  # learning rate annealed to 1% of `lr` over the epochs, stepped per epoch
    validation: float
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 32


PAPER_TRAINING = Training(width=512, standardise=False, cosine=True, validation=0.2)
VARIANT_TRAINING = Training(width=256, standardise=True, cosine=False, validation=0.0)


def train_probe(features: torch.Tensor, labels: torch.Tensor, training: Training,
                seed: int = 0) -> tuple[DifficultyProbe, list[float]]:
    """Cross-entropy with AdamW, mini-batches in a seeded order. Returns the probe and each
    epoch's validation macro-F1 (empty without a validation share)."""
    generator = torch.Generator().manual_seed(seed)
    features = features.float()
    fit, check = torch.arange(len(labels)), torch.arange(0)
    if training.validation:
        order = torch.randperm(len(labels), generator=generator)
        cut = round(len(labels) * training.validation)
        fit, check = order[cut:], order[:cut]
    mean = scale = None
    if training.standardise:
        mean = features[fit].mean(0)
        scale = features[fit].std(0, unbiased=False).clamp_min(1e-6)
    torch.manual_seed(seed)
    probe = DifficultyProbe(features.shape[1], training.width, mean, scale)
    optimiser = torch.optim.AdamW(probe.parameters(), lr=training.lr,
                                  weight_decay=training.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=training.epochs, eta_min=training.lr / 100) if training.cosine else None
    loss_fn = nn.CrossEntropyLoss()
    scores: list[float] = []
    best_state = None
    for _ in range(training.epochs):
        probe.train()
        batches = fit[torch.randperm(len(fit), generator=generator)]
        for start in range(0, len(batches), training.batch_size):
            batch = batches[start:start + training.batch_size]
            optimiser.zero_grad()
            loss_fn(probe(features[batch]), labels[batch]).backward()
            optimiser.step()
        if schedule is not None:
            schedule.step()
        if len(check):
            scores.append(macro_f1(probe.probabilities(features[check]).argmax(-1),
                                   labels[check]))
            if scores[-1] > max(scores[:-1], default=-1.0):
                best_state = copy.deepcopy(probe.state_dict())
    if best_state is not None:
        probe.load_state_dict(best_state)
    return probe.eval(), scores


def held_out_split(labels: torch.Tensor, test_fraction: float,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices, stratified by class so a rare class appears in both."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = round(len(members) * test_fraction)
        test.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def macro_f1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean F1 over the classes that occur among the labels or the predictions
    (scikit-learn's macro average; the authors' checkpoint criterion)."""
    scores = []
    for cls in torch.cat([predicted, labels]).unique():
        hit = int(((predicted == cls) & (labels == cls)).sum())
        wrong = int((predicted != labels)[(predicted == cls) | (labels == cls)].sum())
        scores.append(2 * hit / (2 * hit + wrong))
    return sum(scores) / len(scores)


def accuracy(probe: DifficultyProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = probe.probabilities(features).argmax(-1)
    return float((predicted == labels).float().mean())


def majority_accuracy(train_labels: torch.Tensor, test_labels: torch.Tensor) -> float:
    """Accuracy of always answering the training set's most common class."""
    majority = torch.bincount(train_labels, minlength=len(CLASSES)).argmax()
    return float((test_labels == majority).float().mean())



@dataclass(frozen=True)
class Strategy(Framing):
    """One class's inference strategy: its framing, sampling temperature and top-p (None:
    the request's), and `budget`, the fraction of the request's maximum tokens."""

    temperature: float = 1.0
    top_p: float | None = None
    budget: float = 1.0


def has_think_tags(think_tokens: int, close_tokens: int) -> bool:
    """Whether a tokenizer has thinking tags: each of `<think>` and `</think>` is one token."""
    return think_tokens == close_tokens == 1


_PAPER_QUESTION = ("{question}\n\nLet's reason step by step, and put your final answer within "
                   "\\boxed{}.")


# The authors' `batch_generate_responses` (1024 tokens in their runs). Their command-line default
# spells the prefix with a literal backslash-n and a doubled backslash; the function's own
# default, used here, is a newline and one backslash.
AUTHORS_CONTINUATION = Continuation(prefix="\nNow the correct answer is \\boxed{",
                                    temperature=0.6, top_p=1.0, max_tokens=1024, stop="}")


@dataclass(frozen=True)
class Labelling:
    """How training questions are answered for their labels: the framing, k samples at a
    temperature and top-p, and the entropy: over each token's `top_logprobs` renormalised
    (`top_logprob_entropy`), or the full distribution's the server reports (0)."""

    framing: Framing
    samples: int
    temperature: float
    top_p: float
    top_logprobs: int


@dataclass(frozen=True)
class RecipeSpec:
    """Everything a recipe fixes: where the probe reads, the strategies, how questions are
    labelled (`thresholds` None: from the data) and how the probe is trained."""

    probe_framing: Framing
    strategies: dict[str, Strategy]
    thresholds: Thresholds | None
    training: Training
    labelling: Labelling
    chat_only: bool  # reads the probe through the chat template
    continuation: Continuation | None  # for an answer its budget cut off (None: none)


RECIPES = {
    Recipe.PAPER: RecipeSpec(
        probe_framing=Framing(_PAPER_QUESTION, prefill=(
            "<think>\n\nI need to analyze the difficulty of the problem first, and then give a "
            "budget control strategy. I think the difficulty of this question is")),
        strategies={name: Strategy(_PAPER_QUESTION, prefill=prefill, system=(
            "You are a helpful and harmless assistant. You should think step-by-step. Please "
            "be concise throughout the reasoning process."), temperature=temperature,
            top_p=top_p, budget=budget) for name, prefill, temperature, top_p, budget in (
            ("easy", "<think>\nThis looks straightforward. Let me solve it directly while "
             "double-checking my approach.</think>", 0.5, 1.0, 0.4),
            ("normal", "<think>\nI'll break this down into clear, logical steps and solve "
             "methodically.", 0.8, 0.95, 1.0),
            ("hard", "<think>\nThis appears intricate. I'll outline the main method while being "
             "mindful of computational resources.", 0.4, 1.0, 0.5))},
        thresholds=PAPER_THRESHOLDS,
        training=PAPER_TRAINING,
        labelling=Labelling(Framing("{question}\nPlease reason step by step, and put your "
                                    "final answer within \\boxed{}.", prefill="<think>\n"),
                            samples=10, temperature=0.6, top_p=0.95, top_logprobs=10),
        chat_only=True,
        continuation=AUTHORS_CONTINUATION),
    # Temperatures and budget fractions from the paper's table; the instructions are ours:
    # Easy = answer directly and check once, Normal = step by step, Hard = outline the method
    # and stop early.
    Recipe.VARIANT: RecipeSpec(
        probe_framing=Framing(),
        strategies={
            "easy": Strategy("{question}\n\nSolve it directly, then check the answer once.",
                             temperature=0.5, budget=0.4),
            "normal": Strategy("{question}\n\nThink step by step.", temperature=0.8),
            "hard": Strategy("{question}\n\nOutline the method briefly, then give your best "
                             "answer without long explanations.", temperature=0.4, budget=0.5)},
        thresholds=None,
        training=VARIANT_TRAINING,
        labelling=Labelling(Framing(), samples=8, temperature=0.8, top_p=1.0, top_logprobs=0),
        chat_only=False,
        continuation=None),
}
