"""A training round under homomorphic aggregation: clients encrypt their weighted updates with
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

from typing import TYPE_CHECKING, Any

import torch

from fedlm.errors import FedlmError
from fedlm.privacy.homomorphic import EncryptedSum, HomomorphicKeys
from fedlm.protocol import FitIns, FitRes, StageIns, StageRes, as_bytes, from_bytes

if TYPE_CHECKING:
    from fedlm.server import FedServer


class HomomorphicError(FedlmError):
    """Homomorphic aggregation cannot complete (no update arrived, no client could decrypt)."""


def encrypted_fit(
    server: FedServer, messages: dict[str, FitIns], weights: dict[str, float]
) -> tuple[torch.Tensor, dict[str, FitRes], dict[str, str], dict[str, Any]]:
    """Train the clients of `messages` with encrypted replies, each update multiplied by its
    weight. Returns the decrypted sum of the valid replies, those replies by name (metrics
    only), why the others were dropped, and a summary for the round's record."""
    deadline = server._deadline()
    encrypted = {
        name: FitIns(ins.parameters, {**ins.config, "homomorphic": {"weight": weights[name]}}, ins.tensors)
        for name, ins in messages.items()
    }
    total = EncryptedSum(server.homomorphic_context)
    replies: dict[str, FitRes] = {}
    dropped: dict[str, str] = {}
    for name, reply in server.transport.fit(encrypted, deadline).items():
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
    for name in sorted(replies):  # the first finished client that answers decrypts the sum
        ins = StageIns("he_decrypt", {"length": server.spec.numel}, summed)
        answer = server.transport.stage({name: ins}, deadline)[name]
        problem = answer if isinstance(answer, str) else _sum_problem(answer, server.spec.numel)
        if problem is None:
            summary = {"clients": len(messages), "finished": len(replies), "decrypted_by": name}
            return answer.tensors["sum"], replies, dropped, summary
        dropped[name] = f"homomorphic aggregation, decrypting the sum: {problem}"
    raise HomomorphicError("no client could decrypt the sum")


def _sum_problem(answer: StageRes, numel: int) -> str | None:
    vector = answer.tensors.get("sum")
    if vector is None or vector.dtype != torch.float32 or vector.shape != (numel,):
        return f"the reply is not the sum as a float32 vector of {numel} values"
    return None


def ciphertexts(tensors: dict[str, torch.Tensor]) -> list[bytes]:
    """The `ciphertext.0`, `ciphertext.1`, ... byte strings of a message, in order."""
    count = sum(key.startswith("ciphertext.") for key in tensors)
    try:
        return [as_bytes(tensors[f"ciphertext.{index}"]) for index in range(count)]
    except KeyError as error:
        raise ValueError(f"ciphertexts are not numbered 0..{count - 1}: {error} is missing") from None


def encrypted_update(keys: HomomorphicKeys, delta: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """A client's weighted delta as ciphertexts, the tensors its reply carries instead of the delta."""
    return {f"ciphertext.{index}": from_bytes(chunk) for index, chunk in enumerate(keys.encrypt(delta * weight))}


def decrypt_sum(keys: HomomorphicKeys, ins: StageIns) -> StageRes:
    """A key holder's answer to `he_decrypt`: the plaintext sum."""
    return StageRes({}, {"sum": keys.decrypt(ciphertexts(ins.tensors), int(ins.config["length"]))})
