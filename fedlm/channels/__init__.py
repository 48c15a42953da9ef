"""Update channels, registered by kind: how client updates reach the server (`UpdateChannel`).

A new channel is one file with both halves of its protocol plus one `register_channel` line;
clients and the Flower ClientApp find a channel's client half here by the kind a fit
instruction names, or by the stage a message asks for."""

from __future__ import annotations

from fedlm.channels.base import ChannelParty, CollectedReplies, RoundContext, UpdateChannel
from fedlm.channels.homomorphic import HomomorphicAggregation
from fedlm.channels.plain import PlainChannel
from fedlm.channels.secure import SecureAggregation
from fedlm.errors import ConfigError

CHANNELS: dict[str, type[UpdateChannel]] = {}


def register_channel(channel_class: type[UpdateChannel]) -> None:
    """Make `channel_class` reachable by its `kind` and its `stages`."""
    kind = getattr(channel_class, "kind", None)
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ValueError(f"{channel_class.__name__}.kind must be an identifier such as 'plain', got {kind!r}")
    if kind in CHANNELS:
        raise ValueError(f"a channel of kind {kind!r} is already registered ({CHANNELS[kind].__name__})")
    taken = {stage for registered in CHANNELS.values() for stage in registered.stages}
    if taken & set(channel_class.stages):
        raise ValueError(f"{channel_class.__name__}: stages {sorted(taken & set(channel_class.stages))} are taken")
    CHANNELS[kind] = channel_class


def channel_for_fit(config: dict) -> type[UpdateChannel]:
    """The channel a fit instruction's `channel` entry names (plain when it names none)."""
    kind = config.get("channel", {}).get("kind", PlainChannel.kind)
    if kind not in CHANNELS:
        raise ConfigError(f"unknown update channel {kind!r}; this client knows {sorted(CHANNELS)}")
    return CHANNELS[kind]


def channel_for_stage(stage: str) -> type[UpdateChannel]:
    """The channel whose client half answers `stage`."""
    for channel_class in CHANNELS.values():
        if stage in channel_class.stages:
            return channel_class
    known = sorted(stage for channel_class in CHANNELS.values() for stage in channel_class.stages)
    raise ConfigError(f"unknown stage {stage!r}; the registered channels answer {known}")


for _channel in (PlainChannel, SecureAggregation, HomomorphicAggregation):
    register_channel(_channel)

__all__ = [
    "CHANNELS",
    "ChannelParty",
    "CollectedReplies",
    "HomomorphicAggregation",
    "PlainChannel",
    "RoundContext",
    "SecureAggregation",
    "UpdateChannel",
    "channel_for_fit",
    "channel_for_stage",
    "register_channel",
]
