"""The federated parameters of a model (all trainable weights) as one flat float32 vector."""

from __future__ import annotations

import torch

from fedlm.core.params import ParamSpec, flatten, unflatten


def federated_spec(model: torch.nn.Module) -> ParamSpec:
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    return ParamSpec(tuple(name for name, _ in named), tuple(tuple(param.shape) for _, param in named))


def get_federated_vector(model: torch.nn.Module) -> torch.Tensor:
    return flatten([param for param in model.parameters() if param.requires_grad])


@torch.no_grad()
def set_federated_vector(model: torch.nn.Module, vector: torch.Tensor) -> None:
    params = [param for param in model.parameters() if param.requires_grad]
    spec = ParamSpec(tuple(str(i) for i in range(len(params))), tuple(tuple(p.shape) for p in params))
    for param, value in zip(params, unflatten(vector, spec)):
        param.copy_(value)
