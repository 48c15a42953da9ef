"""The homomorphic aggregation channel: clients encrypt their weighted updates with
a CKKS key that only they hold, the server adds the ciphertexts with the public context, and one
client (a key holder) decrypts the sum (`fedlm.privacy.homomorphic`).

The server holds the encrypted updates and the encrypted sum, never a plaintext update; the key
holder sees only the sum, as every client does once the new model is broadcast. Unlike secure
aggregation, a client that drops out after sending costs nothing (its ciphertext is simply not
added); the price is size and time (about 80 bytes per value and 1.2 s per million values per
client, BENCHMARKS.md) and trust in the clients to keep the shared secret key from the server.
Each update is weighted before encryption as under secure aggregation. Like secure aggregation it
assumes a server that follows the protocol: the key holder cannot tell the sum from one client's
ciphertext that a dishonest server sent it instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedlm import gate
from fedlm.channels.base import ChannelParty, CollectedReplies, RoundContext, UpdateChannel
from fedlm.errors import ConfigError, FedlmError, WireError
from fedlm.privacy.homomorphic import EncryptedSum, HomomorphicKeys
from fedlm.protocol import FitIns, FitRes, StageIns, StageRes, as_bytes, from_bytes


class HomomorphicError(FedlmError):
    """Homomorphic aggregation cannot complete (no update arrived, no client could decrypt)."""


class HomomorphicAggregation(UpdateChannel):
    """Clients send CKKS ciphertexts that the server adds with `public_context`
    (`HomomorphicKeys.public_context()`); the clients hold the secret key, as their
    `channel_state["homomorphic"]` (`FedClient.homomorphic_keys`)."""

    kind: ClassVar[str] = "homomorphic"
    sums: ClassVar[bool] = True
    stages: ClassVar[tuple[str, ...]] = ("he_decrypt",)

    def __init__(self, public_context: bytes) -> None:
        self.public_context = public_context

    def max_reply_bytes(self, numel: int) -> int:
        # ciphertexts take about 80 bytes a value (8,192-degree CKKS, 4,096 values each)
        return max(super().max_reply_bytes(numel), 100 * numel + (1 << 20))

    def collect(self, context: RoundContext, messages: dict[str, FitIns]) -> CollectedReplies:
        try:
            total, replies, dropped, summary = encrypted_round(self.public_context, context, messages)
        except HomomorphicError as error:
            return CollectedReplies({}, error=str(error))
        return CollectedReplies({**dropped, **replies}, total, sum(context.weights[name] for name in replies), summary)

    @classmethod
    def seal(cls, party: ChannelParty, result: FitRes, ins: FitIns) -> FitRes:
        """The weighted update as ciphertexts, in the reply's tensors instead of the delta."""
        encrypted = encrypted_update(_keys(party), result.delta, float(ins.config["channel"]["weight"]))
        return FitRes(torch.zeros(0), result.num_examples, result.metrics, encrypted)

    @classmethod
    def answer(cls, party: ChannelParty, ins: StageIns) -> StageRes:
        if ins.stage != "he_decrypt":
            raise ConfigError(f"client {party.name}: unknown stage {ins.stage!r}")
        return decrypt_sum(_keys(party), ins)


def _keys(party: ChannelParty) -> HomomorphicKeys:
    keys = party.channel_state.get(HomomorphicAggregation.kind)
    if keys is None:
        raise ConfigError(
            f"client {party.name}: homomorphic aggregation needs the clients' CKKS secret key "
            "(FedClient.homomorphic_keys, a fedlm.privacy.homomorphic.HomomorphicKeys)"
        )
    return keys


def encrypted_round(
    public_context: bytes, context: RoundContext, messages: dict[str, FitIns]
) -> tuple[torch.Tensor, dict[str, FitRes], dict[str, str], dict[str, Any]]:
    """Train the clients of `messages` with encrypted replies, each update multiplied by its
    weight. Returns the decrypted sum of the valid replies, those replies by name (metrics
    only), why the others were dropped, and a summary for the round's record."""
    deadline = context.deadline
    channel = {"kind": HomomorphicAggregation.kind}
    encrypted = {
        name: FitIns(
            ins.parameters, {**ins.config, "channel": {**channel, "weight": context.weights[name]}}, ins.tensors
        )
        for name, ins in messages.items()
    }
    length = context.numel + 1  # the weighted update, then its weight: the sum's integrity check
    total = EncryptedSum(public_context, length)
    replies: dict[str, FitRes] = {}
    dropped: dict[str, str] = {}
    for name, reply in context.transport.fit(encrypted, deadline).items():
        try:
            if isinstance(reply, str):
                raise ValueError(reply)
            total.add(ciphertexts(reply.extras))
            replies[name] = reply
        except ValueError as error:
            dropped[name] = f"homomorphic aggregation: {error}"
    if not replies:
        raise HomomorphicError("no client sent a valid encrypted update")
    summed = {f"ciphertext.{index}": from_bytes(chunk) for index, chunk in enumerate(total.ciphertexts())}
    expected_weight = sum(context.weights[name] for name in replies)
    for name in sorted(replies):  # the first finished client that answers decrypts the sum
        ins = StageIns("he_decrypt", {"length": length}, summed)
        answer = context.transport.stage({name: ins}, deadline)[name]
        problem = answer if isinstance(answer, str) else _sum_problem(answer, length)
        if problem is None:
            decrypted = answer.tensors["sum"]
            _check_integrity(decrypted, expected_weight)
            summary = {"clients": len(messages), "finished": len(replies), "decrypted_by": name}
            return decrypted[:-1], replies, dropped, summary
        dropped[name] = f"homomorphic aggregation, decrypting the sum: {problem}"
    raise HomomorphicError("no client could decrypt the sum")


def _sum_problem(answer: StageRes, length: int) -> str | None:
    vector = answer.tensors.get("sum")
    if set(answer.tensors) != {"sum"} or vector.dtype != torch.float32 or vector.shape != (length,):
        return f"the reply is not the sum as a float32 vector of {length} values"
    return None


def _check_integrity(decrypted: torch.Tensor, expected_weight: float) -> None:
    """Refuse a sum that cannot be the sum of the replies the server added: every client appends
    its weight to its update, so the last value must be the known total weight (to within CKKS's
    error), and every value must be finite. A ciphertext under another key, or corrupted, decrypts
    to noise of order 1e30 and fails this. Which client sent it cannot be told from the sum."""
    found = float(decrypted[-1])
    if not torch.isfinite(decrypted).all() or abs(found - expected_weight) > 1e-3 * max(1.0, expected_weight):
        raise HomomorphicError(
            f"the decrypted sum failed its integrity check (total weight {found:.6g}, expected "
            f"{expected_weight:.6g}): some client encrypted under another key or sent corrupted ciphertexts"
        )


def ciphertexts(tensors: dict[str, torch.Tensor]) -> list[bytes]:
    """The `ciphertext.0`, `ciphertext.1`, ... byte strings of a message, in order; ValueError
    for any other tensor, a gap in the numbering, or a tensor that is not a byte string."""
    count = len(tensors)
    try:
        return [as_bytes(gate.byte_string(tensors, f"ciphertext.{index}")) for index in range(count)]
    except WireError as error:
        raise ValueError(f"expected byte strings ciphertext.0..{count - 1} only: {error}") from None


def encrypted_update(keys: HomomorphicKeys, delta: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """A client's weighted delta followed by its weight (the sum's integrity check) as
    ciphertexts, the tensors its reply carries instead of the delta."""
    values = torch.cat([delta * weight, torch.tensor([weight], dtype=delta.dtype)])
    return {f"ciphertext.{index}": from_bytes(chunk) for index, chunk in enumerate(keys.encrypt(values))}


def decrypt_sum(keys: HomomorphicKeys, ins: StageIns) -> StageRes:
    """A key holder's answer to `he_decrypt`: the plaintext sum."""
    return StageRes({}, {"sum": keys.decrypt(ciphertexts(ins.tensors), int(ins.config["length"]))})
