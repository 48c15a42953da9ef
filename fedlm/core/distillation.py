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
from dataclasses import dataclass

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
    probabilities: list[torch.Tensor],
    num_examples: list[int],
    weighting: str = "examples",
    classes: list[int] | None = None,
) -> torch.Tensor:
    """Weights (clients x public examples) that sum to 1 over clients for every example;
    `classes`, how many classes each client's certainty (`entropy`) is measured over (default:
    all of them)."""
    if weighting == "examples":
        counts = torch.tensor(num_examples, dtype=torch.float64)
        raw = counts.unsqueeze(1).expand(len(probabilities), probabilities[0].shape[0])
    elif weighting == "confidence":
        raw = torch.stack([p.max(dim=-1).values for p in probabilities])
    elif weighting == "entropy":
        counts = classes or [probabilities[0].shape[-1]] * len(probabilities)
        entropy = torch.stack([-(p * p.clamp_min(1e-12).log()).sum(dim=-1) for p in probabilities])
        largest = torch.tensor([math.log(count) if count > 1 else 1.0 for count in counts], dtype=entropy.dtype)
        raw = (1 - entropy / largest.unsqueeze(1)).clamp_min(1e-6)  # a uniform guess still counts a little
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


@dataclass
class MaskedSoftLabels:
    """Soft labels of clients that each know only some of the federation's labels (experts on
    different label sets or domains): client i's probabilities over its own labels L_i, renormalised
    over them and 0 elsewhere (`probabilities`, clients x examples x classes), its `masks` (clients
    x classes, True on L_i), and its weight per example (`weights`, clients x examples, summing to
    1 over clients). The student, whose classes are the union of the L_i, learns from client i only
    how it ranks L_i: its softmax restricted and renormalised to L_i is matched to client i's (the
    KL of Vongkulbhisal et al., "Unifying heterogeneous classifiers with distillation", CVPR 2019)."""

    probabilities: torch.Tensor
    masks: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return self.probabilities.shape[1]

    def __getitem__(self, rows: list[int]) -> MaskedSoftLabels:
        return MaskedSoftLabels(self.probabilities[:, rows], self.masks, self.weights[:, rows])

    def to(self, device: str | torch.device) -> MaskedSoftLabels:
        return MaskedSoftLabels(self.probabilities.to(device), self.masks.to(device), self.weights.to(device))

    @classmethod
    def of(
        cls, probabilities: list[torch.Tensor], masks: torch.Tensor, num_examples: list[int], weighting: str
    ) -> MaskedSoftLabels:
        """From each client's probabilities over every class (examples x classes) and its mask:
        each restricted to its labels (`restrict`), weighted as `soft_label_weights` weighs them,
        the certainty of `entropy` measured over the client's own labels."""
        restricted = torch.stack([restrict(p, mask) for p, mask in zip(probabilities, masks)])
        weights = soft_label_weights(list(restricted), num_examples, weighting, masks.sum(dim=-1).tolist())
        return cls(restricted, masks, weights)

    def kl(self, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """T^2 sum_i w_i KL(p_i || softmax(student / T) restricted to L_i), averaged over examples."""
        log_student = F.log_softmax(student_logits / temperature, dim=-1)
        outside = ~self.masks.unsqueeze(1)  # clients x 1 x classes
        restricted = log_student.unsqueeze(0).masked_fill(outside, -math.inf)
        restricted = (restricted - restricted.logsumexp(dim=-1, keepdim=True)).masked_fill(outside, 0.0)
        teacher = self.probabilities.to(log_student.dtype)
        divergence = (torch.xlogy(teacher, teacher) - teacher * restricted).sum(dim=-1)  # clients x examples
        return (self.weights.to(log_student.dtype) * divergence).sum(dim=0).mean() * temperature**2

    def confidence(self) -> float:
        """The weighted mean over clients of their largest probability, averaged over examples."""
        return float((self.weights * self.probabilities.max(dim=-1).values).sum(dim=0).mean())


def restrict(probabilities: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`probabilities` (examples x classes) renormalised over the classes `mask` keeps, 0 elsewhere
    (uniform over them where the kept mass is 0)."""
    kept = probabilities.double() * mask
    total = kept.sum(dim=-1, keepdim=True)
    uniform = mask.double().expand_as(kept) / mask.sum()
    return torch.where(total > 0, kept / total.clamp_min(1e-300), uniform)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probabilities: torch.Tensor | MaskedSoftLabels,
    temperature: float,
    labels: torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
) -> torch.Tensor:
    """T^2 KL(teacher || softmax(student / T)), averaged over examples (the T^2 keeps gradient
    sizes independent of T; `MaskedSoftLabels.kl` for clients' soft labels over their own
    labels), mixed as (1 - h) KD + h CE(student, labels) when labels are given and
    `hard_label_weight` h > 0."""
    if isinstance(teacher_probabilities, MaskedSoftLabels):
        soft = teacher_probabilities.kl(student_logits, temperature)
    else:
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


def merge_top_k(
    indices: list[torch.Tensor], log_probabilities: list[torch.Tensor], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clients' top-k next-token distributions (each positions x k: token ids and their
    log-probabilities) merged into one sparse distribution per position: each client's
    probabilities weighted by its share of `weights`, summed per token over the union of the
    clients' top-k tokens, and renormalised over that union. Returns (token ids, probabilities),
    both positions x U, U the largest union; a shorter union is padded with token 0 at
    probability 0."""
    if not indices:
        raise ValueError("no client distributions to merge")
    shares = torch.tensor(weights, dtype=torch.float64)
    shares = shares / shares.sum()
    ids = torch.cat(indices, dim=1)
    probabilities = torch.cat([lp.double().exp() * share for lp, share in zip(log_probabilities, shares)], dim=1)
    sorted_ids, order = ids.sort(dim=1)
    sorted_probabilities = probabilities.gather(1, order)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    slot = starts.long().cumsum(dim=1) - 1  # each entry's place in its position's union
    width = int(slot.max()) + 1
    merged = torch.zeros(ids.shape[0], width, dtype=torch.float64).scatter_add_(1, slot, sorted_probabilities)
    tokens = torch.zeros(ids.shape[0], width, dtype=torch.long).scatter_(1, slot, sorted_ids)
    return tokens, merged / merged.sum(dim=1, keepdim=True)


def sparse_distillation_loss(
    student_logits: torch.Tensor, tokens: torch.Tensor, probabilities: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 cross-entropy of softmax(student / T) (positions x vocabulary) against the teacher's
    sparse distributions (`merge_top_k`'s tokens and probabilities), averaged over positions:
    KL(teacher || student) but for the teacher's entropy, which does not depend on the student."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(1, tokens)
    return -(probabilities.to(log_student.dtype) * log_student).sum(dim=-1).mean() * temperature**2
