"""Federated knowledge distillation: soft labels from the clients' logits, and the loss that
trains a student on them.

Clients send logits on a shared public set instead of weights (FedMD, Li and Wang 2019,
arXiv:1910.03581; FedDF, Lin et al. 2020, arXiv:2006.07242; FedKD, Wu et al. 2022,
arXiv:2108.13323); the server turns them into one probability distribution per public example
and trains a student to match it (Hinton et al. 2015, arXiv:1503.02531).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

# how clients' probabilities are weighted per public example: by the client's training examples,
# by its confidence (largest probability), or by its certainty (1 - entropy / log C)
SOFT_LABEL_WEIGHTINGS = ("examples", "confidence", "entropy")


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over the last axis: T > 1 flattens the distribution and so keeps what
    a model thinks of the classes it did not pick."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits.double() / temperature, dim=-1)


def soft_label_weights(
    probabilities: list[torch.Tensor], num_examples: list[int], weighting: str = "examples"
) -> torch.Tensor:
    """Weights (clients x public examples) that sum to 1 over clients for every example."""
    if weighting == "examples":
        counts = torch.tensor(num_examples, dtype=torch.float64)
        raw = counts.unsqueeze(1).expand(len(probabilities), probabilities[0].shape[0])
    elif weighting == "confidence":
        raw = torch.stack([p.max(dim=-1).values for p in probabilities])
    elif weighting == "entropy":
        classes = probabilities[0].shape[-1]
        entropy = torch.stack([-(p * p.clamp_min(1e-12).log()).sum(dim=-1) for p in probabilities])
        raw = (1 - entropy / math.log(classes)).clamp_min(1e-6)  # a uniform guess still counts a little
    else:
        raise ValueError(f"weighting must be one of {list(SOFT_LABEL_WEIGHTINGS)}, got {weighting!r}")
    return raw / raw.sum(dim=0, keepdim=True)


def aggregate_soft_labels(
    probabilities: list[torch.Tensor], num_examples: list[int], weighting: str = "examples"
) -> torch.Tensor:
    """The clients' probabilities (each public examples x classes) averaged per example with
    `soft_label_weights`: a probability distribution per public example."""
    if not probabilities:
        raise ValueError("no client probabilities to aggregate")
    weights = soft_label_weights(probabilities, num_examples, weighting)
    stacked = torch.stack([p.double() for p in probabilities])
    return (weights.unsqueeze(-1) * stacked).sum(dim=0)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probabilities: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
) -> torch.Tensor:
    """T^2 KL(teacher || softmax(student / T)), averaged over examples (the T^2 keeps gradient
    sizes independent of T), mixed as (1 - h) KD + h CE(student, labels) when labels are given
    and `hard_label_weight` h > 0."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = teacher_probabilities.to(log_student.dtype)
    soft = F.kl_div(log_student, teacher, reduction="batchmean") * temperature**2
    if labels is None or hard_label_weight == 0:
        return soft
    return (1 - hard_label_weight) * soft + hard_label_weight * F.cross_entropy(student_logits, labels)


def fingerprint(texts: list[str]) -> str:
    """A short hash of a list of texts, to check that two parties hold the same public set."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
