"""Secure aggregation: the server learns the sum of the clients' updates and nothing else.

SecAgg (Bonawitz et al. 2017, ePrint 2017/281) with SecAgg+'s sparse neighbourhoods (Bell et al.
2020, ePrint 2020/704), built from `cryptography`'s primitives:
  1. every client makes two X25519 key pairs: one to encrypt messages to its neighbours, one to
     agree pairwise mask seeds with them;
  2. every client Shamir-shares (threshold t, over the prime field GF(2^521 - 1)) its self-mask
     seed b_u and its mask private key among its neighbours, each share encrypted with AES-GCM
     under a key agreed with that neighbour (the server only routes ciphertexts);
  3. every client quantizes its update into the ring Z_{2^32}, adds PRG(b_u), and adds or subtracts
     PRG(s_uv) for each neighbour v (the sign by index), so that the pairwise masks cancel in the
     sum; a masked vector alone is uniformly distributed;
  4. the surviving clients reveal, for every survivor, its share of b and, for every neighbour that
     dropped out before sending its masked input, its share of the mask key; no client ever
     reveals both for one client. With t shares the server removes the self-masks of the
     survivors and the pairwise masks that dropped clients left behind, and obtains the sum.
Neighbourhoods form a Harary graph over a seeded random order of the clients: k neighbours each
(k = n - 1 is SecAgg; k = O(log n) is SecAgg+, so the cost per client grows with log n, not n).
Fewer than t surviving neighbours of some client makes the sum unrecoverable: `SecAggError`,
never a wrong sum.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlm.errors import FedlmError

PRIME = 2**521 - 1  # a Mersenne prime above every shared secret (32-byte seeds and keys)
SHARE_BYTES = 66
PUBLIC_KEY_BYTES = 32
SEALED_SHARE_BYTES = 12 + 2 * SHARE_BYTES + 16  # nonce, two shares, AES-GCM tag
RING_BITS = 32


class SecAggError(FedlmError):
    """Secure aggregation cannot complete (too many dropouts, a refused unmasking request)."""


@dataclass(frozen=True)
class SecAggSettings:
    """`num_clients` n taking part, `threshold` t shares to rebuild a secret, `num_neighbours` k
    per client, updates clipped to [-clip_range, clip_range] and quantized to `bits` bits (so the
    sum of n of them fits the 32-bit ring), `graph_seed` for the public neighbourhood graph."""

    num_clients: int
    threshold: int
    num_neighbours: int
    clip_range: float = 1.0
    graph_seed: int = 0
    bits: int = field(init=False)

    def __post_init__(self) -> None:
        n, k, t = self.num_clients, self.num_neighbours, self.threshold
        if n < 2:
            raise SecAggError(f"secure aggregation needs at least 2 clients, got {n}")
        if not 1 <= k <= n - 1:
            raise SecAggError(f"num_neighbours must be in 1..{n - 1} for {n} clients, got {k}")
        if not 2 <= t <= k:
            raise SecAggError(f"threshold must be in 2..num_neighbours ({k}), got {t}")
        object.__setattr__(self, "bits", RING_BITS - math.ceil(math.log2(n)))

    @classmethod
    def for_clients(cls, num_clients: int, clip_range: float = 1.0, graph_seed: int = 0) -> SecAggSettings:
        """SecAgg+'s defaults: k = min(n - 1, 2 ceil(log2 n) + 2) neighbours, t = a majority of them."""
        k = min(num_clients - 1, 2 * math.ceil(math.log2(max(num_clients, 2))) + 2)
        return cls(num_clients, max(2, k // 2 + 1), k, clip_range, graph_seed)

    @property
    def step(self) -> float:
        return 2 * self.clip_range / (2**self.bits - 1)


def neighbourhoods(settings: SecAggSettings) -> list[list[int]]:
    """Each client's neighbours: k/2 on each side (plus one more ahead when k is odd) in a seeded
    random cyclic order of the clients: a k-connected Harary graph."""
    n, k = settings.num_clients, settings.num_neighbours
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.graph_seed)).tolist()
    position = {client: index for index, client in enumerate(order)}
    offsets = [d for d in range(1, k // 2 + 1)] + [-d for d in range(1, k // 2 + 1)]
    if k % 2:
        offsets.append(n // 2)
    result = []
    for client in range(n):
        found = {order[(position[client] + offset) % n] for offset in offsets} - {client}
        result.append(sorted(found))
    # the graph must be symmetric: v neighbours u iff u neighbours v
    for client, around in enumerate(result):
        for other in around:
            if client not in result[other]:
                result[other] = sorted({*result[other], client})
    return result


# ---- primitives -----------------------------------------------------------------------------


def _kdf(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedlm secagg " + purpose).derive(secret)


def prg(seed: bytes, length: int) -> torch.Tensor:
    """`length` pseudo-random ring elements (int64 in [0, 2^32)) from a 32-byte seed (AES-256-CTR)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    words = np.frombuffer(encryptor.update(b"\0" * (4 * length)), dtype="<u4")
    return torch.from_numpy(words.astype(np.int64))


def share_secret(secret: int, holders: list[int], threshold: int) -> dict[int, int]:
    """Shamir's shares of `secret` (< PRIME) for `holders` (evaluated at holder index + 1)."""
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for holder in holders:
        x, value = holder + 1, 0
        for coefficient in reversed(coefficients):
            value = (value * x + coefficient) % PRIME
        shares[holder] = value
    return shares


def reconstruct_secret(shares: dict[int, int]) -> int:
    """The secret from shares {holder: share} by Lagrange interpolation at 0."""
    secret = 0
    for holder, share in shares.items():
        x_j, numerator, denominator = holder + 1, 1, 1
        for other in shares:
            if other != holder:
                numerator = numerator * -(other + 1) % PRIME
                denominator = denominator * (x_j - (other + 1)) % PRIME
        secret = (secret + share * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret


def quantize(update: torch.Tensor, settings: SecAggSettings) -> torch.Tensor:
    """`update` clipped to [-B, B] and mapped to integers in [0, 2^bits) with unbiased stochastic
    rounding (from the operating system's randomness)."""
    scaled = (update.double().clamp(-settings.clip_range, settings.clip_range) + settings.clip_range) / settings.step
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    floor = scaled.floor()
    rounded = floor + (torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < scaled - floor)
    return rounded.clamp(0, 2**settings.bits - 1).to(torch.int64)


def dequantize_sum(total: torch.Tensor, count: int, settings: SecAggSettings) -> torch.Tensor:
    """The float sum of `count` quantized updates from the sum of their ring elements."""
    return (total.double() * settings.step - count * settings.clip_range).to(torch.float32)


def public_key_problem(data: bytes) -> str | None:
    """Why `data` is not an X25519 public key a client can agree a secret with (None if it is):
    a wrong length, or a low-order point, for which the key exchange fails."""
    if len(data) != PUBLIC_KEY_BYTES:
        return f"expected {PUBLIC_KEY_BYTES} bytes, got {len(data)}"
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(data))
    except ValueError as error:
        return f"not a usable X25519 public key ({error})"
    return None


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_int(key: X25519PrivateKey) -> int:
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return int.from_bytes(raw, "big")


def _pair_seed(private: X25519PrivateKey, public: bytes) -> bytes:
    return _kdf(private.exchange(X25519PublicKey.from_public_bytes(public)), b"pairwise mask")


def pairwise_masks(index: int, private: X25519PrivateKey, neighbours: dict[int, bytes], length: int) -> torch.Tensor:
    """Sum over neighbours v of +PRG(s_uv) if index < v else -PRG(s_uv), in the ring."""
    total = torch.zeros(length, dtype=torch.int64)
    for other, public in neighbours.items():
        mask = prg(_pair_seed(private, public), length)
        total += mask if index < other else -mask
    return total % 2**RING_BITS


# ---- the parties ------------------------------------------------------------------------------


class SecAggClient:
    """One client's side of a secure aggregation round; its secrets never leave it unshared."""

    def __init__(self, index: int, settings: SecAggSettings, neighbours: list[int]) -> None:
        self.index = index
        self.settings = settings
        self.neighbours = neighbours
        self._channel_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(32)
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (share of its b, share of its mask key)

    def public_keys(self) -> tuple[bytes, bytes]:
        """Stage 1: (channel public key, mask public key), to be sent to the neighbours."""
        return _public_bytes(self._channel_key), _public_bytes(self._mask_key)

    def share_keys(self, keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 2: given the neighbours' public keys, a ciphertext for each neighbour holding its
        shares of this client's self-mask seed and mask private key."""
        missing = [v for v in self.neighbours if v not in keys]
        if len(self.neighbours) - len(missing) < self.settings.threshold:
            raise SecAggError(
                f"client {self.index}: only {len(keys)} neighbours advertised keys, threshold is {self.settings.threshold}"
            )
        self._keys = {v: keys[v] for v in self.neighbours if v in keys}
        holders = sorted(self._keys)
        b_shares = share_secret(int.from_bytes(self._self_seed, "big"), holders, self.settings.threshold)
        key_shares = share_secret(_private_int(self._mask_key), holders, self.settings.threshold)
        return {v: self._seal(v, b_shares[v], key_shares[v]) for v in holders}

    def masked_input(self, update: torch.Tensor, ciphertexts: dict[int, bytes]) -> torch.Tensor:
        """Stage 3: open the shares sent to this client (by the neighbours that got as far as
        sharing), then return its quantized update masked with its self-mask and a pairwise
        mask with each of those neighbours (ring elements, uniformly distributed)."""
        for sender, ciphertext in ciphertexts.items():
            self._held[sender] = self._open(sender, ciphertext)
        masks = {v: self._keys[v][1] for v in ciphertexts}
        masked = quantize(update, self.settings) + prg(self._self_seed, update.numel())
        masked += pairwise_masks(self.index, self._mask_key, masks, update.numel())
        return masked % 2**RING_BITS

    def reveal(self, survivors: set[int], dropped: set[int]) -> dict[str, dict[int, int]]:
        """Stage 4: this client's shares of the survivors' self-mask seeds and of the dropped
        neighbours' mask keys. Refuses a request that names one client in both sets."""
        if survivors & dropped:
            raise SecAggError(
                f"client {self.index}: refused to reveal both secrets of clients {sorted(survivors & dropped)}"
            )
        return {
            "self_seed": {u: self._held[u][0] for u in survivors if u in self._held},
            "mask_key": {u: self._held[u][1] for u in dropped if u in self._held},
        }

    def to_json(self) -> str:
        """Its secrets and what it received, for a runtime that keeps a client's state between
        messages on its own node (Flower's node state); never for sending anywhere."""
        raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        settings = self.settings
        return json.dumps({
            "index": self.index, "neighbours": self.neighbours,
            "settings": [settings.num_clients, settings.threshold, settings.num_neighbours, settings.clip_range,
                         settings.graph_seed],
            "channel_key": self._channel_key.private_bytes(*raw).hex(), "mask_key": self._mask_key.private_bytes(*raw).hex(),
            "self_seed": self._self_seed.hex(),
            "keys": {str(v): [channel.hex(), mask.hex()] for v, (channel, mask) in self._keys.items()},
            "held": {str(v): [str(b), str(k)] for v, (b, k) in self._held.items()},
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> SecAggClient:
        state = json.loads(text)
        client = cls(state["index"], SecAggSettings(*state["settings"]), state["neighbours"])
        client._channel_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["channel_key"]))
        client._mask_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["mask_key"]))
        client._self_seed = bytes.fromhex(state["self_seed"])
        client._keys = {int(v): (bytes.fromhex(c), bytes.fromhex(m)) for v, (c, m) in state["keys"].items()}
        client._held = {int(v): (int(b), int(k)) for v, (b, k) in state["held"].items()}
        return client

    def _channel(self, other: int) -> AESGCM:
        shared = self._channel_key.exchange(X25519PublicKey.from_public_bytes(self._keys[other][0]))
        return AESGCM(_kdf(shared, b"share channel"))

    def _seal(self, receiver: int, b_share: int, key_share: int) -> bytes:
        nonce = secrets.token_bytes(12)
        plaintext = b_share.to_bytes(SHARE_BYTES, "big") + key_share.to_bytes(SHARE_BYTES, "big")
        header = f"{self.index}->{receiver}".encode()
        return nonce + self._channel(receiver).encrypt(nonce, plaintext, header)

    def _open(self, sender: int, ciphertext: bytes) -> tuple[int, int]:
        header = f"{sender}->{self.index}".encode()
        try:
            plaintext = self._channel(sender).decrypt(ciphertext[:12], ciphertext[12:], header)
        except InvalidTag:
            raise SecAggError(
                f"client {self.index}: the key shares from client {sender} failed authentication"
            ) from None
        return int.from_bytes(plaintext[:SHARE_BYTES], "big"), int.from_bytes(plaintext[SHARE_BYTES:], "big")


class SecAggServer:
    """The server's side: routes keys and ciphertexts, sums masked inputs, removes the masks."""

    def __init__(self, settings: SecAggSettings) -> None:
        self.settings = settings
        self.neighbours = neighbourhoods(settings)
        self.mask_public: dict[int, bytes] = {}

    def unmask(
        self, masked: dict[int, torch.Tensor], revealed: dict[int, dict[str, dict[int, int]]], shared: set[int]
    ) -> torch.Tensor:
        """The float sum of the survivors' updates (`masked` by client), from the shares the
        surviving clients `revealed`; `shared`: the clients that sent their shares (the ones
        the survivors masked with)."""
        survivors = set(masked)
        if not survivors:
            raise SecAggError("cannot unmask: no client sent its masked input")
        length = next(iter(masked.values())).numel()
        total = sum(masked.values()) % 2**RING_BITS
        for u in survivors:
            seed = self._rebuild(u, "self_seed", revealed)
            total = (total - prg(seed.to_bytes(32, "big"), length)) % 2**RING_BITS
        for u in shared - survivors:  # shared its keys, then dropped before masking
            key = X25519PrivateKey.from_private_bytes(self._rebuild(u, "mask_key", revealed).to_bytes(32, "big"))
            left_behind = {v: self.mask_public[v] for v in self.neighbours[u] if v in survivors}
            # their masks with u were added by the survivors with the opposite sign to u's view
            total = (total + pairwise_masks(u, key, left_behind, length)) % 2**RING_BITS
        return dequantize_sum(total, len(survivors), self.settings)

    def _rebuild(self, client: int, secret: str, revealed: dict[int, dict[str, dict[int, int]]]) -> int:
        shares = {holder: answer[secret][client] for holder, answer in revealed.items() if client in answer[secret]}
        if len(shares) < self.settings.threshold:
            raise SecAggError(
                f"cannot unmask: only {len(shares)} surviving neighbours of client {client} revealed their share, "
                f"threshold is {self.settings.threshold}; too many clients dropped out"
            )
        return reconstruct_secret(dict(list(shares.items())[: self.settings.threshold]))


def secure_sum(
    updates: dict[int, torch.Tensor],
    settings: SecAggSettings,
    dropped_before_masking: frozenset[int] = frozenset(),
    dropped_before_unmasking: frozenset[int] = frozenset(),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run the four stages in process for clients 0..n-1 (`updates` by index); clients in
    `dropped_before_masking` go away after sharing their keys, those in
    `dropped_before_unmasking` after sending their masked input. Returns the sum of the
    surviving clients' updates and the masked vectors the server saw."""
    server = SecAggServer(settings)
    clients = {i: SecAggClient(i, settings, server.neighbours[i]) for i in range(settings.num_clients)}
    keys = {i: client.public_keys() for i, client in clients.items()}
    server.mask_public = {i: pair[1] for i, pair in keys.items()}
    outbox = {i: client.share_keys({v: keys[v] for v in client.neighbours}) for i, client in clients.items()}
    masked = {}
    for i, client in clients.items():
        if i not in dropped_before_masking:
            inbox = {sender: sent[i] for sender, sent in outbox.items() if i in sent}
            masked[i] = client.masked_input(updates[i], inbox)
    survivors = set(masked)
    answering = survivors - set(dropped_before_unmasking)
    dropped = set(range(settings.num_clients)) - survivors
    revealed = {
        i: clients[i].reveal(survivors & set(clients[i].neighbours), dropped & set(clients[i].neighbours))
        for i in answering
    }
    return server.unmask(masked, revealed, set(range(settings.num_clients))), masked
