"""The strategy interface: flat global vector + client updates in, new global vector out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from fedlm.core.update import ClientUpdate


class Strategy(ABC):
    """Turns one round's client updates into the next global parameters.

    State that must survive a checkpoint (server optimizer moments, control variates) lives in
    `state_dict()` as tensors; stateless strategies return an empty dict.
    """

    @abstractmethod
    def aggregate(self, global_params: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        """Return the new global parameters (a new tensor; `global_params` is not modified)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")
