"""The strategy interface: flat global vector + client updates in, new global vector out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from fedlm.core.aggregate import weighted_mean_delta
from fedlm.core.robust import RobustAggregate, clip_to_norm
from fedlm.core.update import ClientUpdate


class Strategy(ABC):
    """Turns one round's client updates into the next global parameters.

    Every strategy can put norm bounding (`clip_norm`: each delta scaled to at most that L2 norm)
    and a robust aggregate (`robust`: median, trimmed mean, Krum) in front of its server step;
    without them the combined delta is the example-weighted mean. State that must survive a
    checkpoint (moments, momentum, control variates) is named in `STATE` and returned by
    `state_dict()` as tensors.
    """

    STATE: ClassVar[tuple[str, ...]] = ()
    # a summing channel weights every client the same instead of by its examples (DP-FedAvg)
    weights_clients_equally: ClassVar[bool] = False

    def __init__(self, robust: RobustAggregate | None = None, clip_norm: float | None = None) -> None:
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        self.robust = robust
        self.clip_norm = clip_norm

    @abstractmethod
    def aggregate(self, global_params: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        """Return the new global parameters (a new tensor; `global_params` is not modified)."""

    def aggregate_sum(
        self, global_params: torch.Tensor, total: torch.Tensor, total_weight: float, num_examples: int
    ) -> torch.Tensor:
        """The step when a summing channel (secure or homomorphic aggregation) hands over only the
        weighted sum of the updates and its total weight: the step on their weighted mean."""
        return self.aggregate(global_params, [ClientUpdate(total / total_weight, num_examples)])

    def private_mean(self, vectors: list[torch.Tensor]) -> torch.Tensor | None:
        """A differentially private mean of `vectors` (the clients' outputs, in federated
        distillation), or None for a strategy without privacy."""
        return None

    def round_noise_multiplier(self, finished: int) -> float | None:
        """The noise multiplier the round just aggregated had, for the privacy accountant (None:
        the configured one, or no privacy)."""
        return None

    def round_metrics(self) -> dict[str, float]:
        """What the round's record shows of the last step (DP's clip norm, say)."""
        return {}

    def configure_fit(self, global_params: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Extra round config and flat tensors sent to every client with the global parameters."""
        return {}, {}

    def combined_delta(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """Clip, then aggregate robustly or by the example-weighted mean; a fresh vector that the
        strategy may overwrite in place."""
        if self.clip_norm is not None:
            updates = clip_to_norm(updates, self.clip_norm)
        return self.robust(updates) if self.robust is not None else weighted_mean_delta(updates)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.STATE if getattr(self, name) is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - set(self.STATE))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no state {unknown}; its state is {list(self.STATE)}")
        for name in self.STATE:
            setattr(self, name, state[name].clone() if name in state else None)
