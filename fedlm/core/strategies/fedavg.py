"""FedAvg: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", arXiv:1602.05629."""

from __future__ import annotations

import torch

from fedlm.core.aggregate import weighted_mean_delta
from fedlm.core.strategies.base import Strategy
from fedlm.core.update import ClientUpdate


class FedAvg(Strategy):
    """w <- w + server_lr * sum_k (n_k / n) delta_k.

    With the default server_lr = 1 this is the example-weighted mean of the client models,
    w = sum_k (n_k / n) w_k.
    """

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError(f"FedAvg server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr

    def aggregate(self, global_params: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        return global_params + self.server_lr * weighted_mean_delta(updates)
