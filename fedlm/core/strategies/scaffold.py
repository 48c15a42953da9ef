"""SCAFFOLD: Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", arXiv:1910.06378 (control variates with the paper's option II)."""

from __future__ import annotations

from typing import Any

import torch

from fedlm.core.strategies.base import Strategy
from fedlm.core.update import ClientUpdate


class Scaffold(Strategy):
    """The server sends its control variate c with the global model. Each client corrects every
    local gradient by (c - c_i), and afterwards sets c_i+ = c_i - c + (x - y_i) / (K lr) for K
    local steps at learning rate lr, sending back delta_i = y_i - x and dc_i = c_i+ - c_i.
    The server steps x <- x + server_lr * mean(delta_i) (example-weighted, as fedlm's FedAvg;
    the paper's uniform mean when clients hold equal data) and c <- c + sum(dc_i) / num_clients.
    Client variates stay with the clients; the correction assumes SGD as the local optimizer.
    """

    STATE = ("server_control",)

    def __init__(self, num_clients: int, server_lr: float = 1.0, **common: Any) -> None:
        super().__init__(**common)
        if num_clients < 1 or not server_lr > 0:
            raise ValueError(f"Scaffold needs num_clients >= 1 and server_lr > 0, got {num_clients} and {server_lr}")
        self.num_clients = num_clients
        self.server_lr = server_lr
        self.server_control: torch.Tensor | None = None

    def configure_fit(self, global_params: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.server_control is None:
            self.server_control = torch.zeros_like(global_params)
        return {"scaffold": True}, {"server_control": self.server_control}

    def aggregate(self, global_params: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        missing = [index for index, update in enumerate(updates) if "control_delta" not in update.extras]
        if missing:
            raise ValueError(f"SCAFFOLD updates {missing} lack 'control_delta'; the clients must run SCAFFOLD")
        if self.server_control is None:
            self.server_control = torch.zeros_like(global_params)
        for update in updates:
            self.server_control.add_(update.extras["control_delta"], alpha=1 / self.num_clients)
        return self.combined_delta(updates).mul_(self.server_lr).add_(global_params)
