"""The one small protocol between the server and its clients.

A client answers `fit` and `evaluate` (`ClientProtocol`); the round loop reaches clients only
through a `ClientTransport`, which sends one round's instructions to many clients and brings back
each one's reply or the reason it has none. In process, `LoopbackTransport` sends every message
through its wire bytes, so what crosses is exactly what a network transport would carry and the
byte counts are measured, not estimated; the Flower runtime's transport sends the same messages
through Flower's deployment engine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self

import torch

from fedlm import gate, wire
from fedlm.core.compression import Compressed, codec_from_spec
from fedlm.errors import WireError

MAX_WIRE_LABELS = 100_000  # target keys one client may report over the wire, whatever a run's max_labels
# the config key under which a remote client's fit and evaluate instructions carry the federation's
# task metadata (`fedlm.tasks.Task.metadata_to_json`: classification's label map)
TASK_METADATA_KEY = "task_metadata"


def _pack(name: str, value: torch.Tensor | Compressed, tensors: dict, meta: dict) -> None:
    if isinstance(value, Compressed):
        tensors.update({f"{name}.{part}": tensor for part, tensor in value.parts.items()})
        meta[f"{name}_codec"] = {**value.spec, "numel": value.numel}
    else:
        tensors[name] = value


def _unpack(name: str, tensors: dict, meta: dict) -> torch.Tensor | Compressed:
    """Remove `name` (or its codec parts) from `tensors` and its codec from `meta`: the vector,
    or its `Compressed` parts (decoded by the receiver once it has checked the declared size)."""
    spec = meta.pop(f"{name}_codec", None)
    if spec is None:
        if name not in tensors:
            raise WireError(f"the message has no {name!r} tensor")
        return tensors.pop(name)
    spec = dict(gate.mapping(spec, f"{name}_codec"))
    numel = gate.integer(spec.pop("numel", None), f"{name}_codec.numel")
    try:
        codec_from_spec(spec)
    except (TypeError, ValueError) as error:
        raise WireError(f"{name}_codec: {error}") from None
    parts = {key[len(name) + 1 :]: tensors.pop(key) for key in list(tensors) if key.startswith(f"{name}.")}
    return Compressed(spec, parts, numel)


class WireMessage:
    """A message as named tensors plus JSON metadata (`to_parts`), and as wire bytes."""

    KIND: ClassVar[str]

    def to_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Self:
        raise NotImplementedError

    def to_bytes(self) -> memoryview:
        return wire.encode(self.KIND, *self.to_parts())

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Self:
        return cls.from_parts(*wire.decode(data, cls.KIND))


@dataclass
class _Instructions(WireMessage):
    """Global parameters plus a config (round number, local epochs, ...), sent by the server.

    One instance goes to every client with the same parameter layout in a round, so its bytes
    are encoded once and reused; treat it as read-only once sent. With `config["lora_base"]`, the
    parameters also hold the base weights of the LoRA-adapted layers (stack aggregation).
    """

    parameters: torch.Tensor | Compressed  # Compressed only on the sending side
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. SCAFFOLD's server control
    _payload: memoryview | None = field(default=None, init=False, repr=False, compare=False)

    def to_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = dict(self.tensors), dict(self.config)
        _pack("parameters", self.parameters, tensors, meta)
        return tensors, meta

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Self:
        tensors, meta = dict(tensors), dict(meta)
        parameters = _unpack("parameters", tensors, meta)
        if isinstance(parameters, Compressed):  # from the server, which knows the size it sends
            parameters = parameters.decode()
        return cls(parameters=parameters, config=meta, tensors=tensors)

    def to_bytes(self) -> memoryview:
        if self._payload is None:
            self._payload = wire.encode(self.KIND, *self.to_parts())
        return self._payload


class FitIns(_Instructions):
    """Train from these parameters with this config."""

    KIND = "fit_ins"


class EvaluateIns(_Instructions):
    """Evaluate these parameters on local data."""

    KIND = "evaluate_ins"


@dataclass
class FitRes(WireMessage):
    """A client's update (delta from the parameters it received), its example count and metrics."""

    delta: torch.Tensor | Compressed  # Compressed as sent: `gate.checked_update` decodes it
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. SCAFFOLD's control delta

    KIND: ClassVar[str] = "fit_res"

    def to_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = dict(self.extras), {"num_examples": self.num_examples, "metrics": self.metrics}
        _pack("delta", self.delta, tensors, meta)
        return tensors, meta

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> FitRes:
        extras, meta = dict(tensors), dict(meta)
        delta = _unpack("delta", extras, meta)
        return cls(
            delta=delta,
            num_examples=gate.integer(meta.get("num_examples"), "num_examples"),
            metrics=gate.metrics(meta.get("metrics")),
            extras=extras,
        )


@dataclass
class EvaluateRes(WireMessage):
    num_examples: int
    metrics: dict[str, float]

    KIND: ClassVar[str] = "evaluate_res"

    def to_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"num_examples": self.num_examples, "metrics": self.metrics}

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> EvaluateRes:
        return cls(
            num_examples=gate.integer(meta.get("num_examples"), "num_examples"),
            metrics=gate.metrics(meta.get("metrics")),
        )


@dataclass
class ClientInfo(WireMessage):
    """What a remote client tells the server about itself before the first round."""

    name: str
    num_examples: int
    num_test_examples: int
    target_keys: list[str]  # what its task reports about its training targets (classification: label keys)
    lora_rank: int | None = None  # its LoRA rank, when it may differ from the global one
    data_fingerprint: dict[str, Any] | None = None  # FedClient.fingerprint_rows of its data, checked on resume
    group: str | None = None  # its main value of the run's data.group_column, for grouped test results

    KIND: ClassVar[str] = "client_info"

    @property
    def has_test_data(self) -> bool:
        return self.num_test_examples > 0

    def to_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {
            "name": self.name,
            "num_examples": self.num_examples,
            "num_test_examples": self.num_test_examples,
            "labels": self.target_keys,  # the key classification clients have always sent
            "lora_rank": self.lora_rank,
            "data_fingerprint": self.data_fingerprint,
            "group": self.group,
        }

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> ClientInfo:
        return cls(
            gate.text(meta.get("name"), "name"),
            gate.integer(meta.get("num_examples"), "num_examples"),
            gate.integer(meta.get("num_test_examples"), "num_test_examples"),
            gate.text_list(meta.get("labels"), "labels", MAX_WIRE_LABELS),
            gate.optional_integer(meta.get("lora_rank"), "lora_rank", minimum=1, maximum=1 << 16),
            _fingerprint(meta.get("data_fingerprint")),
            None if meta.get("group") is None else gate.text(meta["group"], "group"),
        )


def _fingerprint(value: Any) -> dict[str, Any] | None:
    """A client's data fingerprint (`FedClient.fingerprint_rows`): example counts and a sha256."""
    if value is None:
        return None
    value = gate.mapping(value, "data_fingerprint")
    digest = gate.text(value.get("sha256"), "data_fingerprint.sha256", max_length=64)
    if len(digest) != 64 or any(char not in "0123456789abcdef" for char in digest):
        raise WireError("data_fingerprint.sha256 must be 64 hexadecimal digits")
    return {
        "examples": gate.integer(value.get("examples"), "data_fingerprint.examples"),
        "test_examples": gate.integer(value.get("test_examples"), "data_fingerprint.test_examples"),
        "sha256": digest,
    }


@dataclass
class StageIns(WireMessage):
    """One step of a multi-message protocol within a round (secure aggregation's key exchange
    and unmasking): which `stage`, a JSON `config`, and byte strings as uint8 tensors."""

    stage: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    KIND: ClassVar[str] = "stage_ins"

    def to_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(self.tensors), {"stage": self.stage, "config": self.config}

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> StageIns:
        return cls(
            gate.text(meta.get("stage"), "stage"), dict(gate.mapping(meta.get("config"), "config")), dict(tensors)
        )


@dataclass
class StageRes(WireMessage):
    """A client's answer to a `StageIns`."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    KIND: ClassVar[str] = "stage_res"

    def to_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(self.tensors), dict(self.meta)

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> StageRes:
        return cls(dict(gate.mapping(meta, "metadata")), dict(tensors))


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.numpy().tobytes()


def from_bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class ClientProtocol(Protocol):
    """What a client answers, wherever it runs."""

    name: str

    def fit(self, ins: FitIns) -> FitRes: ...

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes: ...

    def stage(self, ins: StageIns) -> StageRes: ...


@dataclass
class ByteCounter:
    """Bytes sent down (server to client) and up (client to server), as serialized, in total and
    per client name."""

    down: int = 0
    up: int = 0
    by_client: dict[str, list[int]] = field(default_factory=dict)  # name -> [down, up]

    def add(self, name: str, down: int = 0, up: int = 0) -> None:
        self.down += down
        self.up += up
        counts = self.by_client.setdefault(name, [0, 0])
        counts[0] += down
        counts[1] += up

    def snapshot(self) -> dict[str | None, tuple[int, int]]:
        """Bytes sent so far, (down, up), per client name and in total (key None)."""
        counts: dict[str | None, tuple[int, int]] = {name: (down, up) for name, (down, up) in self.by_client.items()}
        counts[None] = (self.down, self.up)
        return counts

    def since(self, before: dict[str | None, tuple[int, int]]) -> dict[str, Any]:
        """`bytes_down`, `bytes_up` and `client_bytes` ({name: {down, up}}) sent since `before`
        (a `snapshot()`), as measured on the serialized messages."""
        moved = {
            name: {"down": down - before.get(name, (0, 0))[0], "up": up - before.get(name, (0, 0))[1]}
            for name, (down, up) in self.snapshot().items()
            if (down, up) != before.get(name, (0, 0))
        }
        total = moved.pop(None, {"down": 0, "up": 0})
        return {"bytes_down": total["down"], "bytes_up": total["up"], "client_bytes": moved}


class ClientTransport(Protocol):
    """Carries one round's instructions to the named clients and brings their replies back.

    Every named client gets an entry in the answer: its decoded reply, or a string saying why
    there is none (it raised, answered after `deadline`, sent an oversized or undecodable reply,
    or went away). `deadline` is a `time.monotonic()` value, None for no deadline.
    """

    bytes: ByteCounter
    parallel: bool  # whether the clients of one exchange work at the same time

    def describe(self, name: str) -> str:
        """The client's name as logs should show it (with its network address or node id)."""
        ...

    def fit(self, messages: Mapping[str, FitIns], deadline: float | None) -> dict[str, FitRes | str]:
        """Send each named client its message (clients often share one message object)."""
        ...

    def evaluate(self, messages: Mapping[str, EvaluateIns], deadline: float | None) -> dict[str, EvaluateRes | str]: ...

    def stage(self, messages: Mapping[str, StageIns], deadline: float | None) -> dict[str, StageRes | str]: ...


class LoopbackTransport:
    """The in-process transport: encodes each message to bytes and decodes it on the other side,
    one client after the other. A reply larger than `max_reply_bytes` is refused before decoding."""

    def __init__(self, clients: Sequence[ClientProtocol], max_reply_bytes: int | None = None) -> None:
        self.clients = {client.name: client for client in clients}
        self.bytes = ByteCounter()
        self.parallel = False
        self.max_reply_bytes = max_reply_bytes

    def describe(self, name: str) -> str:
        return name

    def fit(self, messages: Mapping[str, FitIns], deadline: float | None) -> dict[str, FitRes | str]:
        return self._exchange(messages, deadline, lambda client, data: client.fit(FitIns.from_bytes(data)), FitRes)

    def evaluate(self, messages: Mapping[str, EvaluateIns], deadline: float | None) -> dict[str, EvaluateRes | str]:
        return self._exchange(
            messages, deadline, lambda client, data: client.evaluate(EvaluateIns.from_bytes(data)), EvaluateRes
        )

    def stage(self, messages: Mapping[str, StageIns], deadline: float | None) -> dict[str, StageRes | str]:
        return self._exchange(
            messages, deadline, lambda client, data: client.stage(StageIns.from_bytes(data)), StageRes
        )

    def _exchange(self, messages, deadline, handle, reply_type) -> dict[str, Any]:
        replies: dict[str, Any] = {}
        for name, message in messages.items():
            payload = message.to_bytes()
            if deadline is not None and time.monotonic() > deadline:
                replies[name] = "not started: the round deadline had passed"
                continue
            self.bytes.add(name, down=len(payload))
            try:
                reply = handle(self.clients[name], payload).to_bytes()
            except Exception as error:  # a failing client must not end the run
                replies[name] = f"{type(error).__name__}: {error}"
                continue
            self.bytes.add(name, up=len(reply))
            if deadline is not None and time.monotonic() > deadline:
                replies[name] = "timed out: answered after the round deadline"
            elif self.max_reply_bytes is not None and len(reply) > self.max_reply_bytes:
                replies[name] = f"reply of {len(reply):,} bytes exceeds the limit of {self.max_reply_bytes:,} bytes"
            else:
                replies[name] = decode_reply(reply_type, reply)
        return replies


def decode_reply(reply_type: type[WireMessage], data: bytes | memoryview) -> WireMessage | str:
    """The decoded reply, or why it cannot be decoded (the validation gate's reason)."""
    try:
        return reply_type.from_bytes(data)
    except WireError as error:
        return f"malformed reply: {error}"
    except Exception as error:  # a gap in the gate must still not end the run
        return f"undecodable reply: {type(error).__name__}: {error}"
