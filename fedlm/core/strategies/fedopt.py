"""Adaptive server optimizers: FedAdagrad, FedAdam, FedYogi (Reddi et al. 2021, "Adaptive
Federated Optimization", arXiv:2003.00295, Algorithm 2).

The pseudo-gradient is the combined client delta; the three differ only in the second moment.
Moments start at zero (as in Flower and PyTorch; the paper allows any v >= tau^2) and no bias
correction is applied (the paper has none; Flower's FedAdam rescales its step by
sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from fedlm.core.strategies.base import Strategy
from fedlm.core.update import ClientUpdate

BLOCK = 1 << 17  # coordinates per fused step


class FedOpt(Strategy):
    """m <- beta_1 m + (1 - beta_1) delta; v <- second_moment(v, delta);
    w <- w + server_lr * m / (sqrt(v) + tau)."""

    STATE = ("first_moment", "second_moment")

    def __init__(
        self, server_lr: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3, **common: Any
    ) -> None:
        super().__init__(**common)
        if not server_lr > 0 or not tau > 0:
            raise ValueError(f"{type(self).__name__} needs server_lr > 0 and tau > 0, got {server_lr} and {tau}")
        if not (0 <= beta_1 < 1 and 0 <= beta_2 < 1):
            raise ValueError(f"{type(self).__name__} betas must be in [0, 1), got {beta_1} and {beta_2}")
        self.server_lr, self.beta_1, self.beta_2, self.tau = server_lr, beta_1, beta_2, tau
        self.first_moment: torch.Tensor | None = None
        self.second_moment: torch.Tensor | None = None

    @abstractmethod
    def update_second_moment(self, second_moment: torch.Tensor, delta: torch.Tensor) -> None:
        """Update `second_moment` in place from `delta` (both one block of coordinates)."""

    def aggregate(self, global_params: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        delta = self.combined_delta(updates)
        if self.first_moment is None:
            self.first_moment = torch.zeros_like(delta)
            self.second_moment = torch.zeros_like(delta)
        # One block at a time, so the moments and the step stay in cache; the step reuses delta's memory.
        for start in range(0, delta.numel(), BLOCK):
            d, m, v = (vector[start : start + BLOCK] for vector in (delta, self.first_moment, self.second_moment))
            m.lerp_(d, 1 - self.beta_1)  # beta_1 m + (1 - beta_1) d
            self.update_second_moment(v, d)
            torch.sqrt(v, out=d).add_(self.tau)
            torch.addcdiv(global_params[start : start + BLOCK], m, d, value=self.server_lr, out=d)
        return delta


class FedAdagrad(FedOpt):
    """v <- v + delta^2 (beta_2 unused)."""

    def update_second_moment(self, second_moment: torch.Tensor, delta: torch.Tensor) -> None:
        second_moment.addcmul_(delta, delta)


class FedAdam(FedOpt):
    """v <- beta_2 v + (1 - beta_2) delta^2."""

    def update_second_moment(self, second_moment: torch.Tensor, delta: torch.Tensor) -> None:
        second_moment.mul_(self.beta_2).addcmul_(delta, delta, value=1 - self.beta_2)


class FedYogi(FedOpt):
    """v <- v - (1 - beta_2) delta^2 sign(v - delta^2)."""

    def update_second_moment(self, second_moment: torch.Tensor, delta: torch.Tensor) -> None:
        squared = delta * delta
        sign = torch.sign(second_moment - squared)
        second_moment.addcmul_(squared, sign, value=-(1 - self.beta_2))
