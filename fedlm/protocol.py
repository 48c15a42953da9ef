"""The one small protocol between the server and its clients.

The round loop only ever calls `fit` and `evaluate` on objects that follow `ClientProtocol`.
In process, `LoopbackProxy` wraps a `FedClient` and sends every message through its wire bytes,
so what crosses is exactly what a network transport would carry and the byte counts are measured,
not estimated; a deployment runtime supplies proxies that send the same bytes over the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self

import torch

from fedlm import wire
from fedlm.errors import ClientError


@dataclass
class _Instructions:
    """Global parameters plus a config (round number, local epochs, ...), sent by the server.

    One instance goes to every client sampled in a round, so its bytes are encoded once and
    reused; treat it as read-only once sent.
    """

    KIND: ClassVar[str]
    parameters: torch.Tensor
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. SCAFFOLD's server control
    _payload: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def to_bytes(self) -> bytes:
        if self._payload is None:
            self._payload = wire.encode(self.KIND, {**self.tensors, "parameters": self.parameters}, self.config)
        return self._payload

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        tensors, meta = wire.decode(data, cls.KIND)
        return cls(parameters=tensors.pop("parameters"), config=meta, tensors=tensors)


class FitIns(_Instructions):
    """Train from these parameters with this config."""

    KIND = "fit_ins"


class EvaluateIns(_Instructions):
    """Evaluate these parameters on local data."""

    KIND = "evaluate_ins"


@dataclass
class FitRes:
    """A client's update (delta from the parameters it received), its example count and metrics."""

    delta: torch.Tensor
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. SCAFFOLD's control delta

    def to_bytes(self) -> bytes:
        meta = {"num_examples": self.num_examples, "metrics": self.metrics}
        return wire.encode("fit_res", {**self.extras, "delta": self.delta}, meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> FitRes:
        tensors, meta = wire.decode(data, "fit_res")
        delta = tensors.pop("delta")
        return cls(delta=delta, num_examples=int(meta["num_examples"]), metrics=meta["metrics"], extras=tensors)


@dataclass
class EvaluateRes:
    num_examples: int
    metrics: dict[str, float]

    def to_bytes(self) -> bytes:
        return wire.encode("evaluate_res", {}, {"num_examples": self.num_examples, "metrics": self.metrics})

    @classmethod
    def from_bytes(cls, data: bytes) -> EvaluateRes:
        _, meta = wire.decode(data, "evaluate_res")
        return cls(num_examples=int(meta["num_examples"]), metrics=meta["metrics"])


class ClientProtocol(Protocol):
    """What the server needs from a client, wherever the client runs."""

    name: str

    def fit(self, ins: FitIns) -> FitRes: ...

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes: ...


@dataclass
class ByteCounter:
    """Bytes sent down (server to client) and up (client to server) through one proxy."""

    down: int = 0
    up: int = 0


class LoopbackProxy:
    """An in-process transport: encodes each message to bytes and decodes it on the other side.
    A reply larger than `max_reply_bytes` is refused before it is decoded."""

    def __init__(self, client: ClientProtocol, max_reply_bytes: int | None = None) -> None:
        self.client = client
        self.name = client.name
        self.bytes = ByteCounter()
        self.max_reply_bytes = max_reply_bytes

    def fit(self, ins: FitIns) -> FitRes:
        payload = ins.to_bytes()
        self.bytes.down += len(payload)
        reply = self.client.fit(FitIns.from_bytes(payload)).to_bytes()
        self.bytes.up += len(reply)
        if self.max_reply_bytes is not None and len(reply) > self.max_reply_bytes:
            raise ClientError(f"reply of {len(reply):,} bytes exceeds the limit of {self.max_reply_bytes:,} bytes")
        return FitRes.from_bytes(reply)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        payload = ins.to_bytes()
        self.bytes.down += len(payload)
        reply = self.client.evaluate(EvaluateIns.from_bytes(payload)).to_bytes()
        self.bytes.up += len(reply)
        return EvaluateRes.from_bytes(reply)
