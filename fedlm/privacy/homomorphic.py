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

from pathlib import Path

import torch

from fedlm.errors import ConfigError
from fedlm.files import refuse_existing, write_new


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

    @classmethod
    def load(cls, path: str | Path) -> HomomorphicKeys:
        """The keys in a secret context file written by `save` (`fedlm he-keys`)."""
        ts = _tenseal()
        try:
            context = ts.context_from(Path(path).read_bytes())
        except OSError as error:
            raise ConfigError(f"cannot read the CKKS secret context {path}: {error.strerror}") from None
        except Exception:  # TenSEAL raises several kinds for bytes that are not a context
            raise ConfigError(f"{path} is not a CKKS context file (make one with fedlm he-keys)") from None
        if not context.is_private():
            raise ConfigError(f"{path} holds a public context without the secret key: give the clients he-secret.ctx")
        keys = cls.__new__(cls)
        keys.context = context
        keys.slots = _slots(context)
        return keys

    def save(self, folder: str | Path, force: bool = False) -> dict[str, Path]:
        """`he-secret.ctx` (for the clients only, readable by the owner alone) and `he-public.ctx`
        (for the server) in `folder`. Existing files are replaced only with `force`."""
        folder = Path(folder)
        secret, public = folder / "he-secret.ctx", folder / "he-public.ctx"
        refuse_existing([secret, public], force)
        folder.mkdir(parents=True, exist_ok=True)
        write_new(secret, self.context.serialize(save_secret_key=True), 0o600, force)
        write_new(public, self.public_context(), 0o644, force)
        return {"secret": secret, "public": public}

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


def read_public_context(path: str | Path | None) -> bytes:
    """The server's public CKKS context from `path` (`he-public.ctx`), refusing a missing file, one
    that is not a context, and a context that holds the secret key (the server must never have it)."""
    ts = _tenseal()
    if path is None:
        raise ConfigError(
            "homomorphic.public_context: the server needs the public context over Flower; make keys with "
            "`fedlm he-keys DIR`, give the server DIR/he-public.ctx and every SuperNode DIR/he-secret.ctx"
        )
    try:
        data = Path(path).read_bytes()
        context = ts.context_from(data)
    except OSError as error:
        raise ConfigError(f"homomorphic.public_context: cannot read {path}: {error.strerror}") from None
    except Exception:  # TenSEAL raises several kinds for bytes that are not a context
        raise ConfigError(f"homomorphic.public_context: {path} is not a CKKS context file (fedlm he-keys)") from None
    if context.is_private():
        raise ConfigError(
            f"homomorphic.public_context: {path} holds the secret key; the server must get he-public.ctx only"
        )
    return data


def _slots(context) -> int:
    return context.data.seal_context().key_context_data().parms().poly_modulus_degree() // 2


class EncryptedSum:
    """The server's running sum of encrypted vectors of `length` values: with the public context
    it can add ciphertexts, never decrypt them. `add` raises ValueError for a count of
    ciphertexts other than `length` needs (the server's own knowledge, not a client's claim) and
    for bytes that are not ciphertexts of this context."""

    def __init__(self, public_context: bytes, length: int) -> None:
        self._ts = _tenseal()
        self.context = self._ts.context_from(public_context)
        self.chunks = -(-length // _slots(self.context))
        self.totals: list | None = None

    def add(self, chunks: list[bytes]) -> None:
        if len(chunks) != self.chunks:
            raise ValueError(f"{len(chunks)} ciphertexts, expected {self.chunks} for the run's vector size")
        try:
            vectors = [self._ts.ckks_vector_from(self.context, chunk) for chunk in chunks]
        except Exception as error:  # TenSEAL raises several kinds for malformed bytes
            raise ValueError(f"not CKKS ciphertexts of this run's context ({type(error).__name__})") from None
        if self.totals is None:
            self.totals = vectors
            return
        for total, vector in zip(self.totals, vectors):
            total += vector

    def ciphertexts(self) -> list[bytes]:
        return [total.serialize() for total in self.totals or []]


def add_encrypted(public_context: bytes, updates: list[list[bytes]], length: int) -> list[bytes]:
    """The chunk-wise sum of the clients' encrypted updates of `length` values, still encrypted."""
    total = EncryptedSum(public_context, length)
    for chunks in updates:
        total.add(chunks)
    return total.ciphertexts()
