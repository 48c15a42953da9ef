"""Seeded held-out splits."""

from __future__ import annotations

import torch


def holdout_split(num_examples: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (kept, held_out) with round(fraction * n) held out, chosen with `seed`."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    held = round(fraction * num_examples)
    return sorted(order[held:]), sorted(order[:held])
