"""Aggregation math shared by strategies."""

from __future__ import annotations

import torch

from fedlm.core.update import ClientUpdate

BLOCK = 1 << 19  # coordinates per block of the weighted sum


def weighted_mean_delta(updates: list[ClientUpdate]) -> torch.Tensor:
    """The example-count-weighted mean of the client deltas: sum_k (n_k / n) delta_k."""
    if not updates:
        raise ValueError("cannot aggregate an empty list of updates")
    total = sum(update.num_examples for update in updates)
    if total <= 0:
        raise ValueError("the updates hold no training examples (sum of num_examples is 0)")
    return weighted_sum([update.delta for update in updates], [update.num_examples / total for update in updates])


def weighted_sum(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_k w_k v_k in one pass over each vector with a single output vector (aggregation is
    memory-bound); a fresh vector, owned by the caller."""
    result = torch.empty_like(vectors[0])
    for start in range(0, result.numel(), BLOCK):  # the block of the sum stays in cache while K vectors stream in
        block = result[start : start + BLOCK]
        torch.mul(vectors[0][start : start + BLOCK], weights[0], out=block)
        for vector, weight in zip(vectors[1:], weights[1:]):
            block.add_(vector[start : start + BLOCK], alpha=weight)
    return result
