"""DiffAdapt (arXiv 2510.19669): a difficulty probe on the prompt's final hidden state picks an
Easy / Normal / Hard inference strategy. Engine-free: labels, the probe, its training, the
strategy table.

Self-labelling (paper §3): sample k answers per training question with the served model; with
mean accuracy `a` and mean token entropy `h`, a question is Normal if a ≥ α and h ≤ β, Hard if
a < γ, Easy otherwise (solved, but with high entropy: the "overthinking" arm of the U-shape).

The probe is the paper's 2-layer MLP over the last-layer hidden state (after the final norm) at
the last prompt token, trained with cross-entropy and AdamW (lr 1e-3, 100 epochs). Inputs are
standardised with the training set's mean and spread, which are stored with the weights.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

CLASSES = ("easy", "normal", "hard")
EASY, NORMAL, HARD = range(3)


@dataclass(frozen=True)
class Thresholds:
    """α: accuracy a Normal question needs; β: entropy it may not exceed; γ: below this
    accuracy a question is Hard."""

    alpha: float
    beta: float
    gamma: float


def difficulty_labels(accuracy: torch.Tensor, entropy: torch.Tensor,
                      thresholds: Thresholds) -> torch.Tensor:
    """Class index per question (0 easy, 1 normal, 2 hard), the paper's rule; Hard wins over
    Normal when γ > α."""
    labels = torch.full(accuracy.shape, EASY, dtype=torch.long)
    labels[(accuracy >= thresholds.alpha) & (entropy <= thresholds.beta)] = NORMAL
    labels[accuracy < thresholds.gamma] = HARD
    return labels


def thresholds_from_data(accuracy: list[float], entropy: list[float], k: int) -> Thresholds:
    """The project's default where the paper reads thresholds off a scatter plot: α = γ = the
    median accuracy (at least one correct answer in k), β = the median entropy of the questions
    at or above it. Solved questions split into confident (Normal) and high-entropy (Easy)
    halves; the rest are Hard."""
    alpha = max(statistics.median(accuracy), 1.0 / k)
    solved = [h for a, h in zip(accuracy, entropy) if a >= alpha]
    beta = statistics.median(solved) if solved else max(entropy)
    return Thresholds(alpha=alpha, beta=beta, gamma=alpha)


class DifficultyProbe(nn.Module):
    """Standardise, then MLP (`width` > 0: Linear-ReLU-Linear, the paper's probe) or a linear
    head (`width` 0, the paper's ablation); logits over CLASSES."""

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


def train_probe(features: torch.Tensor, labels: torch.Tensor, width: int, *, epochs: int = 100,
                lr: float = 1e-3, weight_decay: float = 1e-2, batch_size: int = 32,
                seed: int = 0) -> DifficultyProbe:
    """Cross-entropy with AdamW (paper: lr 1e-3, 100 epochs), mini-batches in a seeded order."""
    generator = torch.Generator().manual_seed(seed)
    features = features.float()
    mean = features.mean(0)
    scale = features.std(0, unbiased=False).clamp_min(1e-6)
    torch.manual_seed(seed)
    probe = DifficultyProbe(features.shape[1], width, mean, scale)
    optimiser = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            batch = order[start:start + batch_size]
            optimiser.zero_grad()
            loss_fn(probe(features[batch]), labels[batch]).backward()
            optimiser.step()
    return probe.eval()


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


def accuracy(probe: DifficultyProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = probe.probabilities(features).argmax(-1)
    return float((predicted == labels).float().mean())


def majority_accuracy(train_labels: torch.Tensor, test_labels: torch.Tensor) -> float:
    """Accuracy of always answering the training set's most common class."""
    majority = torch.bincount(train_labels, minlength=len(CLASSES)).argmax()
    return float((test_labels == majority).float().mean())


@dataclass(frozen=True)
class Strategy:
    """One class's inference strategy: `prompt` wraps the question ('{question}' marks where),
    `budget` is the fraction of the request's maximum tokens."""

    prompt: str
    temperature: float
    budget: float


# Temperatures and budget fractions from the paper's table; the prompt texts are ours (the
# paper's wording is not public): Easy = answer directly and check once, Normal = step by step,
# Hard = outline the method and stop early.
DEFAULT_STRATEGIES = {
    "easy": Strategy("{question}\n\nSolve it directly, then check the answer once.", 0.5, 0.4),
    "normal": Strategy("{question}\n\nThink step by step.", 0.8, 1.0),
    "hard": Strategy("{question}\n\nOutline the method briefly, then give your best answer "
                     "without long explanations.", 0.4, 0.5),
}
