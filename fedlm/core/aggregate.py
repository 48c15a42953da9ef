"""Aggregation math shared by strategies."""

from __future__ import annotations

import torch

from fedlm.core.update import ClientUpdate


def weighted_mean_delta(updates: list[ClientUpdate]) -> torch.Tensor:
    """The example-count-weighted mean of the client deltas: sum_k (n_k / n) delta_k."""
    if not updates:
        raise ValueError("cannot aggregate an empty list of updates")
    total = sum(update.num_examples for update in updates)
    if total <= 0:
        raise ValueError("the updates hold no training examples (sum of num_examples is 0)")
    mean = torch.zeros_like(updates[0].delta)
    for update in updates:
        mean.add_(update.delta, alpha=update.num_examples / total)
    return mean
