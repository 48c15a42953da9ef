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


class EncryptedSum:
    """The server's running sum of encrypted updates: with the public context it can add
    ciphertexts, never decrypt them. `add` raises ValueError for bytes that are not ciphertexts of
    this context, or a count that differs from the first update's."""

    def __init__(self, public_context: bytes) -> None:
        self._ts = _tenseal()
        self.context = self._ts.context_from(public_context)
        self.totals: list | None = None

    def add(self, chunks: list[bytes]) -> None:
        try:
            vectors = [self._ts.ckks_vector_from(self.context, chunk) for chunk in chunks]
        except Exception as error:  # TenSEAL raises several kinds for malformed bytes
            raise ValueError(f"not CKKS ciphertexts of this run's context ({type(error).__name__})") from None
        if self.totals is None:
            self.totals = vectors
            return
        if len(vectors) != len(self.totals):
            raise ValueError(f"{len(vectors)} ciphertexts, expected {len(self.totals)} like the other clients")
        for total, vector in zip(self.totals, vectors):
            total += vector

    def ciphertexts(self) -> list[bytes]:
        return [total.serialize() for total in self.totals or []]


def add_encrypted(public_context: bytes, updates: list[list[bytes]]) -> list[bytes]:
    """The chunk-wise sum of the clients' encrypted updates, still encrypted."""
    total = EncryptedSum(public_context)
    for chunks in updates:
        total.add(chunks)
    return total.ciphertexts()
