"""Aggregation math shared by strategies."""

from __future__ import annotations

import torch

from fedlm.core.update import ClientUpdate


def weighted_mean_delta(updates: list[ClientUpdate]) -> torch.Tensor:
    """The example-count-weighted mean of the client deltas: sum_k (n_k / n) delta_k, in one
    pass over each delta with a single output vector (aggregation is memory-bound)."""
    if not updates:
        raise ValueError("cannot aggregate an empty list of updates")
    total = sum(update.num_examples for update in updates)
    if total <= 0:
        raise ValueError("the updates hold no training examples (sum of num_examples is 0)")
    mean = torch.mul(updates[0].delta, updates[0].num_examples / total)  # a fresh vector, owned by the caller
    for update in updates[1:]:
        mean.add_(update.delta, alpha=update.num_examples / total)
    return mean
