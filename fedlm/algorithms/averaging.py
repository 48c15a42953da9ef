"""Weight averaging, the default algorithm: clients send weight updates, the strategy turns them
into the next global parameters, and LoRA factors are re-factored as configured."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedlm.core.compression import Codec
from fedlm.core.strategies import Strategy
from fedlm.core.update import ClientUpdate
from fedlm.errors import ConfigError
from fedlm.protocol import EvaluateIns, FitIns

if TYPE_CHECKING:  # the server's global model, used through its methods only
    from fedlm.server.global_model import GlobalModel


class WeightAveraging:
    """FedAvg-style rounds with any `Strategy` (the algorithm a server runs when given none)."""

    replaces_weights = False  # clients train and send the global model's parameters

    def fit_messages(
        self, model: GlobalModel, strategy: Strategy, names: list[str], base: dict[str, Any], codec: Codec | None
    ) -> dict[str, FitIns]:
        """The round's instructions: the global parameters in each client's layout, with the
        strategy's round config and tensors (`codec` compresses the parameters)."""
        config, tensors = strategy.configure_fit(model.params)
        if tensors and any(not layout.same_ranks for layout in model.layouts.values()):
            raise ConfigError(
                f"{type(strategy).__name__} sends per-parameter state to clients, which clients of lower "
                "LoRA ranks cannot use; give every client the same rank or choose another strategy"
            )
        return model.messages(names, FitIns, {**base, **config}, tensors, codec)

    def evaluate_messages(self, model: GlobalModel, names: list[str], round_number: int) -> dict[str, EvaluateIns]:
        return model.messages(names, EvaluateIns, {"round": round_number}, {})

    def upload_numel(self, model: GlobalModel, name: str | None = None) -> int:
        return model.upload_numel(name)

    def check_update(self, model: GlobalModel, update: ClientUpdate) -> None:
        """What the validation gate cannot know about an update (its values' meaning): nothing to check."""
        return None

    def aggregate(
        self,
        model: GlobalModel,
        strategy: Strategy,
        updates: list[ClientUpdate],
        seed: int,
        round_number: int,
        summed: tuple[torch.Tensor, float] | None = None,
    ) -> dict[str, Any]:
        """The strategy's step and, for LoRA adapters, the configured re-factoring; under a summing
        channel the step gets the weighted sum of the updates and its total weight (`summed`;
        `updates` then carry metrics only). Returns what the round's record shows of it."""
        previous = model.params
        if summed is not None:
            total, weight = summed
            model.params = strategy.aggregate_sum(previous, total, weight, sum(u.num_examples for u in updates))
            return {}
        model.params = strategy.aggregate(previous, updates)
        return model.refactor(previous, updates)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the algorithm (weight averaging keeps nothing: the strategy
        and the global model hold the state)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take back `state_dict()`'s tensors (none here)."""
