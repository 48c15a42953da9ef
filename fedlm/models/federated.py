"""The federated parameters of a model (all trainable weights) as one flat float32 vector."""

from __future__ import annotations

import torch

from fedlm.core.params import ParamSpec, flatten, unflatten


def federated_spec(model: torch.nn.Module) -> ParamSpec:
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    return ParamSpec(tuple(name for name, _ in named), tuple(tuple(param.shape) for _, param in named))


def get_federated_vector(model: torch.nn.Module) -> torch.Tensor:
    return flatten(_trainable(model))


@torch.no_grad()
def set_federated_vector(model: torch.nn.Module, vector: torch.Tensor) -> None:
    """Copy `vector` into the trainable parameters (the model never aliases `vector`)."""
    for param, value in zip(_trainable(model), unflatten(vector, federated_spec(model)), strict=True):
        param.copy_(value)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]
