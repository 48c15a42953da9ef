"""Homomorphic aggregation: the server adds encrypted updates without being able to read them
(`pip install 'fedlm[he]'`, TenSEAL's CKKS, Cheon et al. 2017).

The clients share a CKKS secret key (made by one of them, or by a key service, and never given to
the server); the server holds only the public context, with which it can add ciphertexts but not
decrypt them. Each client encrypts its update in chunks of `slots` values; the server sums the
chunks; a key holder decrypts the sum. CKKS is approximate: the decrypted sum is off by about
1e-6 relative to the values' scale at the default parameters. Everything crosses as TenSEAL's own
serialization (protocol buffers), never as pickles.
"""

from __future__ import annotations

import torch

from fedlm.errors import ConfigError


def _tenseal():
    try:
        import tenseal
    except ImportError:
        raise ConfigError("homomorphic aggregation needs TenSEAL: pip install 'fedlm[he]'") from None
    return tenseal


class HomomorphicKeys:
    """A CKKS context with its secret key (for clients only) and its public part (for the server).

    Defaults: polynomial modulus degree 8192 (4096 values per ciphertext), coefficient moduli of
    60, 40, 40 and 60 bits and scale 2^40, about 128-bit security (the HE standard's table)."""

    def __init__(
        self, poly_modulus_degree: int = 8192, coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    ) -> None:
        ts = _tenseal()
        self.context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree, -1, list(coeff_mod_bit_sizes))
        self.context.global_scale = 2**40
        self.slots = poly_modulus_degree // 2

    def public_context(self) -> bytes:
        """The context without its secret key: what the server gets."""
        public = self.context.copy()
        public.make_context_public()
        return public.serialize()

    def encrypt(self, vector: torch.Tensor) -> list[bytes]:
        """`vector` as ciphertexts of `slots` values each, serialized."""
        ts = _tenseal()
        values = vector.detach().double().reshape(-1)
        return [
            ts.ckks_vector(self.context, values[start : start + self.slots].tolist()).serialize()
            for start in range(0, values.numel(), self.slots)
        ]

    def decrypt(self, chunks: list[bytes], length: int) -> torch.Tensor:
        ts = _tenseal()
        values = [value for chunk in chunks for value in ts.ckks_vector_from(self.context, chunk).decrypt()]
        if len(values) < length:
            raise ValueError(f"{len(chunks)} ciphertexts hold {len(values)} values, expected {length}")
        return torch.tensor(values[:length], dtype=torch.float32)


def add_encrypted(public_context: bytes, updates: list[list[bytes]]) -> list[bytes]:
    """The server's step: the chunk-wise sum of the clients' encrypted updates, still encrypted
    (the public context can add, not decrypt)."""
    ts = _tenseal()
    if not updates or len({len(chunks) for chunks in updates}) != 1:
        raise ValueError("every client must send the same number of ciphertexts")
    context = ts.context_from(public_context)
    totals = [ts.ckks_vector_from(context, chunk) for chunk in updates[0]]
    for chunks in updates[1:]:
        for index, chunk in enumerate(chunks):
            totals[index] += ts.ckks_vector_from(context, chunk)
    return [total.serialize() for total in totals]
