"""The plain channel: every client's update reaches the server as it is, or through a lossy
codec (`fedlm.core.compression`) with optional error feedback."""

from __future__ import annotations

from typing import Any, ClassVar

from fedlm.channels.base import ChannelParty, CollectedReplies, RoundContext, UpdateChannel
from fedlm.core.compression import Compressed, ErrorFeedback, codec_from_spec, codec_spec
from fedlm.protocol import FitIns, FitRes


class PlainChannel(UpdateChannel):
    """Updates in the clear; `upload_codec` (a codec spec such as {"kind": "int8"}, optionally
    with "error_feedback": true) compresses them on the way up."""

    kind: ClassVar[str] = "plain"

    def __init__(self, upload_codec: dict[str, Any] | None = None) -> None:
        self.upload_codec = upload_codec

    def fit_config(self) -> dict[str, Any]:
        return {} if self.upload_codec is None else {"upload_codec": self.upload_codec}

    def collect(self, context: RoundContext, messages: dict[str, FitIns]) -> CollectedReplies:
        return CollectedReplies(context.transport.fit(messages, context.deadline))

    @classmethod
    def seal(cls, party: ChannelParty, result: FitRes, ins: FitIns) -> FitRes:
        """The delta through the server's upload codec; with error feedback, what the codec drops
        is kept in the client's `residual` and added to the next round's delta."""
        spec = ins.config.get("upload_codec")
        if spec is None:
            return result
        codec = codec_from_spec(spec)
        if not spec.get("error_feedback"):
            result.delta = Compressed.encode(codec, result.delta)
            return result
        feedback = ErrorFeedback(codec, party.residual)
        parts = feedback.encode(result.delta)
        party.residual = feedback.residual
        result.delta = Compressed(codec_spec(codec), parts, result.delta.numel())
        return result
