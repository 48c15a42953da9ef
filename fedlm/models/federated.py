"""The federated parameters of a model as one flat float32 vector: all trainable weights, and
with `lora_base` also the frozen base weights of the LoRA-adapted layers (which FLoRA-style
stacking updates every round; `fedlm.core.lora.fold_products`)."""

from __future__ import annotations

import torch

from fedlm.core.params import ParamSpec, flatten, unflatten


def federated_spec(model: torch.nn.Module, lora_base: bool = False) -> ParamSpec:
    named = _federated(model, lora_base)
    return ParamSpec(tuple(name for name, _ in named), tuple(tuple(param.shape) for _, param in named))


def get_federated_vector(model: torch.nn.Module, lora_base: bool = False) -> torch.Tensor:
    return flatten([param for _, param in _federated(model, lora_base)])


@torch.no_grad()
def set_federated_vector(model: torch.nn.Module, vector: torch.Tensor, lora_base: bool = False) -> None:
    """Copy `vector` into the federated parameters (the model never aliases `vector`)."""
    named = _federated(model, lora_base)
    spec = ParamSpec(tuple(name for name, _ in named), tuple(tuple(param.shape) for _, param in named))
    for (_, param), value in zip(named, unflatten(vector, spec), strict=True):
        param.copy_(value)


def _federated(model: torch.nn.Module, lora_base: bool) -> list[tuple[str, torch.nn.Parameter]]:
    adapted = {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    return [
        (name, param)
        for name, param in model.named_parameters()
        if param.requires_grad
        or (lora_base and name.endswith(".base_layer.weight") and name[: -len(".base_layer.weight")] in adapted)
    ]
