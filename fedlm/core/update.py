"""What a client sends back after local training."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ClientUpdate:
    """A client's update: `delta` = client parameters minus the global parameters it started from.

    `delta` is one flat float32 vector; `num_examples` is the number of local training examples
    (the FedAvg weight n_k); `metrics` are the client's scalar training metrics; `extras` holds
    further flat vectors a strategy asks for (SCAFFOLD's control-variate change).
    """

    delta: torch.Tensor
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
