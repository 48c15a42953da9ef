"""Homomorphic aggregation: the server adds what it cannot read; a key holder reads the sum."""

from __future__ import annotations

import pytest
import torch

from fedlm.privacy.homomorphic import HomomorphicKeys, add_encrypted


@pytest.fixture(scope="module")
def keys() -> HomomorphicKeys:
    return HomomorphicKeys()


def test_the_sum_of_ciphertexts_decrypts_to_the_plain_sum(keys):
    generator = torch.Generator().manual_seed(0)
    updates = [0.1 * torch.randn(10_000, generator=generator) for _ in range(3)]  # 3 ciphertexts each
    encrypted = [keys.encrypt(update) for update in updates]
    assert all(len(chunks) == 3 for chunks in encrypted)
    total = keys.decrypt(add_encrypted(keys.public_context(), encrypted, 10_000), 10_000)
    assert torch.allclose(total, sum(updates), atol=1e-5)


def test_the_server_context_cannot_decrypt(keys):
    import tenseal as ts

    public = ts.context_from(keys.public_context())
    summed = add_encrypted(keys.public_context(), [keys.encrypt(torch.ones(8))] * 2, 8)
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector_from(public, summed[0]).decrypt()
    assert torch.allclose(keys.decrypt(summed, 8), torch.full((8,), 2.0), atol=1e-5)


def test_clients_must_send_the_ciphertext_count_the_servers_vector_size_needs(keys):
    with pytest.raises(ValueError, match="2 ciphertexts, expected 1 for the run's vector size"):
        add_encrypted(keys.public_context(), [keys.encrypt(torch.ones(8)), keys.encrypt(torch.ones(5000))], 8)
    # the first sender does not decide the count: a wrong first one is refused, not the honest rest
    with pytest.raises(ValueError, match="2 ciphertexts, expected 1 for the run's vector size"):
        add_encrypted(keys.public_context(), [keys.encrypt(torch.ones(5000)), keys.encrypt(torch.ones(8))], 8)
    with pytest.raises(ValueError, match="0 ciphertexts, expected 1"):
        add_encrypted(keys.public_context(), [[]], 8)
    with pytest.raises(ValueError, match="not CKKS ciphertexts of this run's context"):
        add_encrypted(keys.public_context(), [[b"\x08\x01 not a ciphertext"]], 8)
