"""FedAvg (McMahan et al. 2017, arXiv:1602.05629), FedAvgM (Hsu et al. 2019, arXiv:1909.06335)
and FedProx (Li et al. 2020, arXiv:1812.06127), which share the server step."""

from __future__ import annotations

from typing import Any

import torch

from fedlm.core.strategies.base import Strategy
from fedlm.core.update import ClientUpdate


class FedAvg(Strategy):
    """w <- w + server_lr * sum_k (n_k / n) delta_k.

    With the default server_lr = 1 this is the example-weighted mean of the client models,
    w = sum_k (n_k / n) w_k.
    """

    def __init__(self, server_lr: float = 1.0, **common: Any) -> None:
        super().__init__(**common)
        if not server_lr > 0:
            raise ValueError(f"{type(self).__name__} server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr

    def aggregate(self, global_params: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        new = self.combined_delta(updates)
        if self.server_lr != 1.0:
            new.mul_(self.server_lr)
        return new.add_(global_params)


class FedAvgM(FedAvg):
    """Server momentum: v <- momentum * v + g, w <- w - server_lr * v, with the pseudo-gradient
    g = -(weighted mean delta) and v starting at 0 (PyTorch SGD's convention, as in Flower)."""

    STATE = ("velocity",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, **common: Any) -> None:
        super().__init__(server_lr, **common)
        if not 0 <= momentum < 1:
            raise ValueError(f"FedAvgM momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.velocity: torch.Tensor | None = None

    def aggregate(self, global_params: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        pseudo_gradient = self.combined_delta(updates).neg_()
        if self.velocity is None:
            self.velocity = pseudo_gradient.clone()
        else:
            self.velocity.mul_(self.momentum).add_(pseudo_gradient)
        return torch.add(global_params, self.velocity, alpha=-self.server_lr, out=pseudo_gradient)


class FedProx(FedAvg):
    """Clients minimise their loss plus mu/2 ||w - w_global||^2, which keeps non-IID clients close
    to the global model; the server step is FedAvg's."""

    def __init__(self, mu: float = 0.01, server_lr: float = 1.0, **common: Any) -> None:
        super().__init__(server_lr, **common)
        if not mu >= 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu

    def configure_fit(self, global_params: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"proximal_mu": self.mu}, {}
