"""The federated parameters of a model as one flat float32 vector: all trainable weights, and
with `lora_base` also the frozen base weights of the LoRA-adapted layers (which FLoRA-style
stacking updates every round; `fedlm.core.lora.fold_products`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlm.core.params import ParamSpec, flatten, unflatten


def federated_spec(model: torch.nn.Module, lora_base: bool = False) -> ParamSpec:
    named = _federated(model, lora_base)
    return ParamSpec(tuple(name for name, _ in named), tuple(tuple(param.shape) for _, param in named))


def get_federated_vector(model: torch.nn.Module, lora_base: bool = False) -> torch.Tensor:
    """The federated parameters as a new flat float32 vector (one copy)."""
    buffer = _flat_buffer(model, lora_base)
    return flatten([param for _, param in _federated(model, lora_base)]) if buffer is None else buffer.clone()


def federated_view(model: torch.nn.Module, lora_base: bool = False) -> torch.Tensor:
    """The federated parameters as a flat vector without a copy where they live in one buffer:
    read it before the model changes again, and never write to it."""
    buffer = _flat_buffer(model, lora_base)
    return get_federated_vector(model, lora_base) if buffer is None else buffer.detach()


@torch.no_grad()
def set_federated_vector(model: torch.nn.Module, vector: torch.Tensor, lora_base: bool = False) -> None:
    """Copy `vector` into the federated parameters (the model never aliases `vector`)."""
    buffer = _flat_buffer(model, lora_base)
    if buffer is not None:
        if vector.shape != buffer.shape:
            raise ValueError(f"vector has shape {list(vector.shape)}, expected [{buffer.numel()}]")
        buffer.copy_(vector)
        return
    named = _federated(model, lora_base)
    spec = ParamSpec(tuple(name for name, _ in named), tuple(tuple(param.shape) for _, param in named))
    for (_, param), value in zip(named, unflatten(vector, spec), strict=True):
        param.copy_(value)


@dataclass
class _FlatParameters:
    """One flat buffer that the federated parameters are views into, and what they were when
    it was made: a moved, replaced or re-cast parameter no longer aliases it."""

    lora_base: bool
    buffer: torch.Tensor
    params: list[torch.nn.Parameter]
    pointers: list[int]

    def intact(self, lora_base: bool, params: list[torch.nn.Parameter]) -> bool:
        return (
            lora_base == self.lora_base
            and len(params) == len(self.params)
            and all(p is q and p.data_ptr() == ptr for p, q, ptr in zip(params, self.params, self.pointers))
        )


@torch.no_grad()
def _flat_buffer(model: torch.nn.Module, lora_base: bool) -> torch.Tensor | None:
    """The flat float32 buffer whose slices are the model's federated parameters, made on first
    use by pointing each parameter at its slice, so that getting and setting the federated
    vector is one copy, not a concatenation of hundreds of tensors. None where the parameters
    cannot share one buffer (not all float32 on one device, e.g. a quantized base)."""
    params = [param for _, param in _federated(model, lora_base)]
    cached = model.__dict__.get(_FLAT_ATTRIBUTE)
    if cached is not None and cached.intact(lora_base, params):
        return cached.buffer
    if not params or any(p.dtype != torch.float32 or p.device != params[0].device for p in params):
        return None
    buffer = torch.cat([param.detach().reshape(-1) for param in params])
    position = 0
    for param in params:
        param.data = buffer[position : position + param.numel()].view(param.shape)
        position += param.numel()
    model.__dict__[_FLAT_ATTRIBUTE] = _FlatParameters(lora_base, buffer, params, [p.data_ptr() for p in params])
    return buffer


_FLAT_ATTRIBUTE = "_fedlm_flat_parameters"


def _federated(model: torch.nn.Module, lora_base: bool) -> list[tuple[str, torch.nn.Parameter]]:
    adapted = {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    return [
        (name, param)
        for name, param in model.named_parameters()
        if param.requires_grad
        or (lora_base and name.endswith(".base_layer.weight") and name[: -len(".base_layer.weight")] in adapted)
    ]
