"""How client updates reach the server: the `UpdateChannel` interface and what a round gives it.

A channel is both halves of one protocol. The server half (`collect`) sends the round's fit
instructions through the transport and brings back either each client's update (the plain
channel) or only their weighted sum (secure and homomorphic aggregation). The client half
(`seal`) turns a client's trained update into what it sends, and `answer` replies to the
channel's extra exchanges (`stages`) around training. A channel sees a small `RoundContext`,
never the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from fedlm.protocol import ClientTransport, FitIns, FitRes, StageIns, StageRes


@dataclass
class RoundContext:
    """What a channel needs of the round: the transport, the round number and run seed, the
    size of one update, the deadline, each sampled client's weight in the sum (its share of the
    examples, or 1 each under differential privacy) and the examples each client declared when
    it joined (a reply may not claim more)."""

    transport: ClientTransport
    round: int
    seed: int
    numel: int
    deadline: float | None
    weights: dict[str, float]
    declared_examples: dict[str, int]


@dataclass
class CollectedReplies:
    """What a channel brings back: each client's reply (an update, or under a summing channel its
    metrics only) or, as a string, why it was dropped, in the order they came; for a summing
    channel the weighted sum and its total weight (None when it could not be recovered: `error`
    says why) and a summary for the round's record."""

    replies: dict[str, FitRes | str]
    total: torch.Tensor | None = None
    total_weight: float = 0.0
    summary: dict[str, Any] | None = None
    error: str | None = None


class ChannelParty(Protocol):
    """The client-side state a channel's client half works with (a `FedClient`, or a Flower
    node's stand-in for stage messages)."""

    name: str | None
    channel_state: dict[str, Any]


class UpdateChannel:
    """The plain interface; `kind` names the channel in configs, messages and round records."""

    kind: ClassVar[str]
    sums: ClassVar[bool] = False  # the server gets only the weighted sum of the updates
    stages: ClassVar[tuple[str, ...]] = ()  # the extra exchanges the client half answers

    def fit_config(self) -> dict[str, Any]:
        """What every fit instruction of a round carries for this channel."""
        return {}

    def max_reply_bytes(self, numel: int) -> int:
        """The largest reply to accept for an update of `numel` values: the update and at most two
        strategy vectors of the same size (SCAFFOLD), plus headers."""
        return 3 * 4 * numel + (1 << 20)

    def collect(self, context: RoundContext, messages: dict[str, FitIns]) -> CollectedReplies:
        raise NotImplementedError

    @classmethod
    def seal(cls, party: ChannelParty, result: FitRes, ins: FitIns) -> FitRes:
        """The reply a client sends for its trained `result`."""
        return result

    @classmethod
    def answer(cls, party: ChannelParty, ins: StageIns) -> StageRes:
        raise NotImplementedError(f"channel {cls.kind} has no stage {ins.stage!r}")
