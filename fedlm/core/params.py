"""Flattening a list of named tensors into one float32 vector and back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of the tensors that make up a flat parameter vector, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def locations(self) -> dict[str, tuple[slice, tuple[int, ...]]]:
        """Each parameter's slice of the flat vector and its shape, by name."""
        found, position = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = math.prod(shape)
            found[name] = (slice(position, position + size), tuple(shape))
            position += size
        return found

    def first_difference(self, other: ParamSpec) -> str | None:
        """Describe the first name or shape where `other` differs from this spec, or None if equal."""
        for index, (name, shape) in enumerate(zip(self.names, self.shapes)):
            if index >= len(other.names):
                return f"missing parameter {name!r}"
            if other.names[index] != name:
                return f"parameter #{index} is {other.names[index]!r}, expected {name!r}"
            if other.shapes[index] != shape:
                return f"parameter {name!r} has shape {list(other.shapes[index])}, expected {list(shape)}"
        if len(other.names) > len(self.names):
            return f"unexpected extra parameter {other.names[len(self.names)]!r}"
        return None


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one contiguous float32 vector (a copy, detached)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])


def unflatten(vector: torch.Tensor, spec: ParamSpec) -> list[torch.Tensor]:
    """Split a flat vector into tensors of the spec's shapes (views into `vector`)."""
    if vector.dim() != 1 or vector.numel() != spec.numel:
        raise ValueError(f"vector has shape {list(vector.shape)}, expected [{spec.numel}]")
    sizes = [math.prod(shape) for shape in spec.shapes]
    return [part.view(shape) for part, shape in zip(vector.split(sizes), spec.shapes)]
