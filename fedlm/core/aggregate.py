"""Aggregation math shared by strategies."""

from __future__ import annotations

import torch

from fedlm.core.update import ClientUpdate

BLOCK = 1 << 19  # coordinates per block of the weighted sum


def weighted_mean_delta(updates: list[ClientUpdate]) -> torch.Tensor:
    """The example-count-weighted mean of the client deltas: sum_k (n_k / n) delta_k, in one
    pass over each delta with a single output vector (aggregation is memory-bound)."""
    if not updates:
        raise ValueError("cannot aggregate an empty list of updates")
    total = sum(update.num_examples for update in updates)
    if total <= 0:
        raise ValueError("the updates hold no training examples (sum of num_examples is 0)")
    weights = [update.num_examples / total for update in updates]
    mean = torch.empty_like(updates[0].delta)  # a fresh vector, owned by the caller
    for start in range(0, mean.numel(), BLOCK):  # the block of the sum stays in cache while K deltas stream in
        block = mean[start : start + BLOCK]
        torch.mul(updates[0].delta[start : start + BLOCK], weights[0], out=block)
        for update, weight in zip(updates[1:], weights[1:]):
            block.add_(update.delta[start : start + BLOCK], alpha=weight)
    return mean
