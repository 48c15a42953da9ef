"""Communication codecs for flat float32 vectors: what a payload shrinks to, and what it costs.

Each codec turns a vector into named tensors to send (`encode`) and back (`decode`):

- `CastCodec("float16" | "bfloat16")`: half the bytes; relative error <= 2^-11 (float16, in its
  normal range) or 2^-8 (bfloat16) per coordinate.
- `Int8Codec(block)`: blockwise absmax quantization (a float32 scale per block, as in Dettmers
  et al. 2022, arXiv:2110.02861): about a quarter of the bytes; each coordinate is off by at most
  half a step, max|block| / 254.
- `TopKCodec(fraction)`: keeps the `fraction` largest-magnitude coordinates (indices + values;
  Aji and Heafield 2017, arXiv:1704.05021). Alone it drops the rest every round; with
  `ErrorFeedback` (Karimireddy et al. 2019, arXiv:1901.09847) the dropped part is carried to the
  next round, so every coordinate is eventually sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

CAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_INT8_BLOCK = 1 << 24


class Codec:
    name: str

    def encode(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class CastCodec(Codec):
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in CAST_DTYPES:
            raise ValueError(f"cast codec dtype must be one of {sorted(CAST_DTYPES)}, got {self.dtype!r}")

    @property
    def name(self) -> str:
        return self.dtype

    def encode(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"values": vector.to(CAST_DTYPES[self.dtype])}

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        return _checked(parts["values"], numel).to(torch.float32)


@dataclass(frozen=True)
class Int8Codec(Codec):
    block: int = 2048
    name: str = field(default="int8", init=False)

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"int8 codec block must be >= 1, got {self.block}")

    def encode(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks = _padded(vector, self.block).view(-1, self.block)
        scale = blocks.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantized = torch.round(blocks / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        return {"q": quantized.view(-1)[: vector.numel()], "scale": scale}

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        quantized, scale = _checked(parts["q"], numel), parts["scale"]
        if scale.numel() != -(-numel // self.block):
            raise ValueError(f"int8 payload has {scale.numel()} scales, expected {-(-numel // self.block)}")
        blocks = _padded(quantized.to(torch.float32), self.block).view(-1, self.block)
        return (blocks * scale.to(torch.float32).unsqueeze(1)).view(-1)[:numel]


@dataclass(frozen=True)
class TopKCodec(Codec):
    fraction: float = 0.01
    name: str = field(default="topk", init=False)

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"top-k fraction must be in (0, 1], got {self.fraction}")

    def encode(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        count = max(1, round(self.fraction * vector.numel()))
        indices = vector.abs().topk(count, sorted=False).indices.sort().values
        return {
            "indices": indices.to(torch.int32 if vector.numel() < 2**31 else torch.int64),
            "values": vector[indices],
        }

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        indices, values = parts["indices"].to(torch.int64), parts["values"].to(torch.float32)
        if indices.shape != values.shape or indices.dim() != 1:
            raise ValueError("top-k payload needs one index per value")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise ValueError(f"top-k payload has indices outside [0, {numel})")
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[indices] = values
        return dense


class ErrorFeedback:
    """Compress `vector + residual` and keep what the codec dropped as the next residual (kept
    by the sender, e.g. the client, between rounds and in its checkpoint)."""

    def __init__(self, codec: Codec, residual: torch.Tensor | None = None) -> None:
        self.codec = codec
        self.residual = residual

    def encode(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        corrected = vector if self.residual is None else vector + self.residual
        parts = self.codec.encode(corrected)
        self.residual = corrected - self.codec.decode(parts, corrected.numel())
        return parts


def payload_bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in parts.values())


def _padded(vector: torch.Tensor, block: int) -> torch.Tensor:
    padding = -vector.numel() % block
    return torch.nn.functional.pad(vector, (0, padding)) if padding else vector


def _checked(values: torch.Tensor, numel: int) -> torch.Tensor:
    if values.dim() != 1 or values.numel() != numel:
        raise ValueError(f"payload has shape {list(values.shape)}, expected [{numel}]")
    return values


def codec_from_spec(spec: dict) -> Codec:
    """A codec from its JSON description, as configs and message headers carry it; ValueError
    for anything else (a header comes from another party: every field is checked)."""
    kind = spec.get("kind")
    if kind in CAST_DTYPES:
        return CastCodec(kind)
    if kind == "int8":
        block = spec.get("block", 2048)
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= MAX_INT8_BLOCK:
            raise ValueError(f"int8 codec block must be an integer in [1, {MAX_INT8_BLOCK}], got {block!r:.40}")
        return Int8Codec(block=block)
    if kind == "topk":
        fraction = spec.get("fraction", 0.01)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise ValueError(f"top-k fraction must be a number, got {fraction!r:.40}")
        return TopKCodec(fraction=float(fraction))
    raise ValueError(f"unknown codec {kind!r:.40}; known: float16, bfloat16, int8, topk")


def codec_spec(codec: Codec) -> dict:
    if isinstance(codec, CastCodec):
        return {"kind": codec.dtype}
    if isinstance(codec, Int8Codec):
        return {"kind": "int8", "block": codec.block}
    if isinstance(codec, TopKCodec):
        return {"kind": "topk", "fraction": codec.fraction}
    raise ValueError(f"no spec for codec {codec!r}")


@dataclass
class Compressed:
    """A flat float32 vector as a codec's parts (what travels) plus the codec's spec."""

    spec: dict[str, Any]
    parts: dict[str, torch.Tensor]
    numel: int

    @classmethod
    def encode(cls, codec: Codec, vector: torch.Tensor) -> Compressed:
        return cls(codec_spec(codec), codec.encode(vector), vector.numel())

    def decode(self) -> torch.Tensor:
        return codec_from_spec(self.spec).decode(self.parts, self.numel)
