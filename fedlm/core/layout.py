"""A client's parameter vector as a part of the global one.

Clients may hold LoRA adapters of a lower rank than the global adapter (FlexLoRA, Bai et al.
2024, arXiv:2402.11505; HetLoRA, Cho et al. 2024): a client of rank r_k holds the leading r_k
rows of each global A and the leading r_k columns of each global B. When the global factors come
from a truncated SVD (`fedlm.core.lora.svd_refactor`) that slice is the best rank-r_k
approximation of the global product. Padding a client's A with zero rows and its B with zero
columns leaves B A unchanged, so a client's factors embed exactly into the global rank. PEFT
multiplies B A by a scaling (alpha / r) that differs between ranks, so B is rescaled on the way:
s_k B_k A_k = s B A. A client may also receive global parameters that it does not train and
therefore does not send back (the adapted layers' base weights in FLoRA-style stacking): they
are in its `download` layout, not in its `upload` layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedlm.core.params import ParamSpec


@dataclass(frozen=True)
class ClientLayout:
    """How one client's vectors map onto the global vector (`global_spec`): `download` is what it
    receives, `upload` what its update covers (both sub-layouts of the global one, by name), and
    `b_scale` the client's LoRA scaling over the global one, per layer (`<layer>.lora_B.` prefix)."""

    global_spec: ParamSpec
    download: ParamSpec
    upload: ParamSpec
    b_scale: dict[str, float]

    def __post_init__(self) -> None:
        found = self.global_spec.locations()
        for spec in (self.download, self.upload):
            for name, shape in zip(spec.names, spec.shapes):
                if name not in found:
                    raise ValueError(f"parameter {name!r} is not in the global model")
                global_shape = found[name][1]
                if shape != global_shape and _rank_axis(name, shape, global_shape) is None:
                    raise ValueError(
                        f"parameter {name!r} has shape {list(shape)}, the global model {list(global_shape)}"
                        f"{' (a client rank may be at most the global rank)' if '.lora_' in name else ''}"
                    )
        missing = [name for name in self.global_spec.names if name not in self.download.names]
        if missing:
            raise ValueError(
                f"it lacks parameter {missing[0]!r}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
            )
        if not set(self.upload.names) <= set(self.download.names):
            raise ValueError("a client can only send back parameters it receives")

    @property
    def same_ranks(self) -> bool:
        """Whether the client's LoRA factors have the global ranks and scalings."""
        found = self.global_spec.locations()
        same_shapes = all(found[name][1] == shape for name, shape in zip(self.download.names, self.download.shapes))
        return same_shapes and all(scale == 1.0 for scale in self.b_scale.values())

    @property
    def is_identity(self) -> bool:
        """Whether client and global vectors are the same (no mapping needed)."""
        return self.same_ranks and self.download == self.global_spec and self.upload == self.global_spec

    def restrict(self, vector: torch.Tensor, upload: bool = False) -> torch.Tensor:
        """The part of a global-layout `vector` in this client's download (or upload) layout."""
        found, parts = self.global_spec.locations(), []
        spec = self.upload if upload else self.download
        for name, shape in zip(spec.names, spec.shapes):
            where, global_shape = found[name]
            block = vector[where].view(global_shape)
            axis = _rank_axis(name, shape, global_shape) if shape != global_shape else None
            if axis == 0:
                block = block[: shape[0]]
            elif axis == 1:
                block = block[:, : shape[1]]
            if ".lora_B." in name:
                block = block / self._scale(name)
            parts.append(block.reshape(-1))
        return torch.cat(parts) if parts else vector.new_zeros(0)

    def embed(self, values: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """Upload-layout `values` in the global layout: global parameters the client does not
        send come from `fallback`, LoRA rows and columns beyond the client's rank are zero."""
        found, result, position = self.global_spec.locations(), fallback.clone(), 0
        for name, shape in zip(self.upload.names, self.upload.shapes):
            size = math.prod(shape)
            block = values[position : position + size].view(shape)
            position += size
            where, global_shape = found[name]
            if ".lora_B." in name:
                block = block * self._scale(name)
            if shape != global_shape:
                padded = block.new_zeros(global_shape)
                padded[tuple(slice(0, extent) for extent in shape)] = block
                block = padded
            result[where] = block.reshape(-1)
        return result

    def _scale(self, name: str) -> float:
        return self.b_scale.get(name.split(".lora_B.")[0], 1.0)


def _rank_axis(name: str, shape: tuple[int, ...], global_shape: tuple[int, ...]) -> int | None:
    """The axis along which a LoRA factor of lower rank is a slice of the global one (A: rows, B:
    columns), or None when `shape` is no such slice."""
    if len(shape) != 2 or len(global_shape) != 2:
        return None
    if ".lora_A." in name and shape[1] == global_shape[1] and shape[0] <= global_shape[0]:
        return 0
    if ".lora_B." in name and shape[0] == global_shape[0] and shape[1] <= global_shape[1]:
        return 1
    return None


def with_rank(spec: ParamSpec, rank: int, drop: tuple[str, ...] = ()) -> ParamSpec:
    """`spec` with every LoRA factor at `rank` (A: rank x in, B: out x rank), without the
    parameters whose names end with one of `drop`."""
    names, shapes = [], []
    for name, shape in zip(spec.names, spec.shapes):
        if name.endswith(drop) and drop:
            continue
        if ".lora_A." in name:
            shape = (rank, shape[1])
        elif ".lora_B." in name:
            shape = (shape[0], rank)
        names.append(name)
        shapes.append(shape)
    return ParamSpec(tuple(names), tuple(shapes))
