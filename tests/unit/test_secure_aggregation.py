"""Secure aggregation: the unmasked sum, dropouts, what a masked vector reveals, bad settings."""

from __future__ import annotations

import pytest
import torch

from fedlm.privacy.secure_aggregation import (
    SecAggClient,
    SecAggError,
    SecAggSettings,
    neighbourhoods,
    reconstruct_secret,
    secure_sum,
    share_secret,
)


def updates(count: int, length: int = 2_000, seed: int = 0) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {i: 0.1 * torch.randn(length, generator=generator) for i in range(count)}


def test_shamir_rebuilds_from_any_threshold_shares_and_not_from_fewer():
    secret = 2**255 + 12345
    shares = share_secret(secret, holders=[0, 3, 5, 7, 9], threshold=3)
    assert reconstruct_secret({h: shares[h] for h in (0, 5, 9)}) == secret
    assert reconstruct_secret({h: shares[h] for h in (3, 7, 9)}) == secret
    assert reconstruct_secret({h: shares[h] for h in (3, 7)}) != secret


def test_neighbourhoods_are_symmetric_and_sparse_for_many_clients():
    settings = SecAggSettings.for_clients(100)
    graph = neighbourhoods(settings)
    assert all(u in graph[v] for u in range(100) for v in graph[u])
    assert max(len(around) for around in graph) <= settings.num_neighbours + 1 < 20  # O(log n), not n - 1


def test_the_unmasked_sum_is_the_plain_sum_within_the_quantization_error():
    settings = SecAggSettings.for_clients(6, clip_range=1.0)
    inputs = updates(6)
    total, _ = secure_sum(inputs, settings)
    float32_rounding = 1e-7  # the sum comes back as float32, like every update
    assert (total - sum(inputs.values())).abs().max() <= 6 * settings.step + float32_rounding


def test_the_sum_survives_dropouts_before_masking_and_before_unmasking():
    settings = SecAggSettings(num_clients=8, threshold=3, num_neighbours=6)
    inputs = updates(8, seed=1)
    total, masked = secure_sum(inputs, settings, frozenset({2, 5}), frozenset({7}))
    assert set(masked) == {0, 1, 3, 4, 6, 7}  # 7 sent its input, then went away: it counts
    expected = sum(inputs[i] for i in masked)
    assert (total - expected).abs().max() <= 6 * settings.step + 1e-7


def test_too_many_dropouts_is_an_error_not_a_wrong_sum():
    settings = SecAggSettings(num_clients=5, threshold=3, num_neighbours=4)
    with pytest.raises(
        SecAggError, match=r"cannot unmask: only 1 surviving neighbours of client \d revealed .* threshold is 3"
    ):
        secure_sum(updates(5), settings, frozenset({0, 1, 2}))


def test_a_masked_vector_looks_uniform_and_hides_its_input():
    settings = SecAggSettings.for_clients(4)
    inputs = {i: torch.full((50_000,), 0.5 if i == 0 else -0.5) for i in range(4)}  # a constant: easy to spot
    _, masked = secure_sum(inputs, settings)
    values = masked[0].double() / 2**32
    histogram = torch.histc(values, bins=16, min=0, max=1)
    expected = 50_000 / 16
    chi_square = float(((histogram - expected) ** 2 / expected).sum())
    assert chi_square < 37.7  # 15 degrees of freedom, p = 0.001
    assert abs(float(values.mean()) - 0.5) < 0.01  # no trace of the constant input


def test_a_client_will_not_reveal_both_secrets_of_one_client():
    settings = SecAggSettings(num_clients=3, threshold=2, num_neighbours=2)
    client = SecAggClient(0, settings, [1, 2])
    with pytest.raises(SecAggError, match="refused to reveal both secrets of clients \\[1\\]"):
        client.reveal({1, 2}, {1})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_clients": 1, "threshold": 2, "num_neighbours": 1}, "at least 2 clients"),
        ({"num_clients": 5, "threshold": 5, "num_neighbours": 4}, "threshold must be in 2..num_neighbours"),
        ({"num_clients": 5, "threshold": 2, "num_neighbours": 5}, "num_neighbours must be in 1..4"),
    ],
)
def test_impossible_settings_are_refused(options, message):
    with pytest.raises(SecAggError, match=message):
        SecAggSettings(**options)


def test_a_clients_secrets_survive_being_kept_between_messages():
    """A Flower node keeps the client's state as text between the exchanges: a client rebuilt
    from it masks exactly as the original would (same keys, seeds and received shares)."""
    settings = SecAggSettings(num_clients=3, threshold=2, num_neighbours=2)
    clients = [SecAggClient(i, settings, neighbourhoods(settings)[i]) for i in range(3)]
    keys = {i: c.public_keys() for i, c in enumerate(clients)}
    outbox = {i: c.share_keys({v: keys[v] for v in c.neighbours}) for i, c in enumerate(clients)}
    inbox = {s: sent[0] for s, sent in outbox.items() if 0 in sent}
    rebuilt = SecAggClient.from_json(clients[0].to_json())
    assert rebuilt.public_keys() == keys[0]
    update = torch.full((1000,), -1.0)  # -clip_range quantizes to exactly 0: the masks must agree
    assert torch.equal(rebuilt.masked_input(update, inbox), clients[0].masked_input(update, inbox))
    assert SecAggClient.from_json(rebuilt.to_json()).reveal({1}, set()) == clients[0].reveal({1}, set())
