"""What a client sends back after local training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class ClientUpdate:
    """A client's update: `delta` = client parameters minus the global parameters it started from.

    `delta` is one flat float32 vector; `num_examples` is the number of local training examples
    (the FedAvg weight n_k); `metrics` are the client's scalar training metrics; `extras` holds
    further flat vectors a strategy asks for (SCAFFOLD's control-variate change); `client` is
    the sender's name ("" for an update the server made, such as a noisy average).
    """

    delta: torch.Tensor
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    client: str = ""


def train_summary(updates: list[ClientUpdate]) -> dict[str, float]:
    """The round's training: example-weighted loss, examples, the clients' training time (summed,
    and the longest: clients train side by side in a deployment) and the rows they skipped."""
    total = sum(update.num_examples for update in updates)
    losses = [(update.metrics.get("loss", math.nan), update.num_examples) for update in updates]
    summary = {
        "train_loss": sum(loss * n for loss, n in losses) / total,
        "train_examples": total,
        "train_seconds": sum(update.metrics.get("seconds", 0.0) for update in updates),
        "train_seconds_max": max(update.metrics.get("seconds", 0.0) for update in updates),  # clients in parallel
    }
    skipped = sum(update.metrics.get("skipped_examples", 0) for update in updates)
    if skipped:  # rows the clients' task could not learn from at the maximum length
        summary["train_skipped_examples"] = skipped
    return summary
