"""Client-level DP: clipping, noise and adaptive clipping against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from fedlm.core.privacy import AdaptiveClipping, DifferentialPrivacy, clip_delta
from fedlm.core.strategies import FedAvg
from fedlm.core.update import ClientUpdate


def test_clipping_scales_long_deltas_to_the_norm_and_keeps_short_ones():
    long, short = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    clipped, norm = clip_delta(long, 1.0)
    assert norm == pytest.approx(5.0) and torch.allclose(clipped, torch.tensor([0.6, 0.8]))
    assert clip_delta(short, 1.0)[0] is short


def test_without_noise_the_result_is_the_sum_of_clipped_deltas_over_the_expected_clients():
    updates = [ClientUpdate(torch.tensor([3.0, 4.0]), 10), ClientUpdate(torch.tensor([0.0, 0.5]), 1000)]
    private = DifferentialPrivacy(noise_multiplier=0.0, clip_norm=1.0, expected_clients=4)
    new = private.aggregate(torch.zeros(2), updates)
    # equal weights (not by examples): ([0.6, 0.8] + [0, 0.5]) / 4
    assert torch.allclose(new, torch.tensor([0.15, 0.325]))
    assert private.last_round == {"clip_norm": 1.0, "unclipped_fraction": 0.5}


def test_server_noise_has_std_z_c_on_the_sum():
    dimension, z, clip, clients = 200_000, 1.5, 0.5, 4
    private = DifferentialPrivacy(noise_multiplier=z, clip_norm=clip, expected_clients=clients, seed=3)
    new = private.aggregate(torch.zeros(dimension), [ClientUpdate(torch.zeros(dimension), 1)])
    assert float((new * clients).std()) == pytest.approx(z * clip, rel=0.01)
    again = DifferentialPrivacy(noise_multiplier=z, clip_norm=clip, expected_clients=clients, seed=3)
    assert torch.equal(again.aggregate(torch.zeros(dimension), [ClientUpdate(torch.zeros(dimension), 1)]), new)


def test_client_noise_is_a_share_sent_in_the_round_config_and_the_server_adds_none():
    private = DifferentialPrivacy(noise_multiplier=2.0, clip_norm=1.0, expected_clients=16, noise="clients")
    config, _ = private.configure_fit(torch.zeros(3))
    assert config == {"dp_clip_norm": 1.0, "dp_noise_std": pytest.approx(2.0 / 4)}  # 16 shares of variance (zC)^2 / 16
    # the client clipped and noised it: the server neither clips again nor adds noise
    assert torch.equal(private.aggregate(torch.zeros(3), [ClientUpdate(torch.ones(3), 1)]), torch.ones(3) / 16)


def test_adaptive_clipping_moves_the_norm_geometrically_towards_the_quantile():
    adaptive = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_noise=1e-9)
    generator = torch.Generator().manual_seed(0)
    # every client unclipped: fraction 1 > 0.5, the norm shrinks by exp(-0.2 * 0.5)
    assert adaptive.next_clip_norm(2.0, 10, 10, generator) == pytest.approx(2.0 * math.exp(-0.1))
    assert adaptive.next_clip_norm(2.0, 0, 10, generator) == pytest.approx(2.0 * math.exp(0.1))
    # Andrew et al., Theorem 1: z_updates = (z^-2 - (2 sigma_b)^-2)^-1/2
    assert AdaptiveClipping(count_noise=2.0).update_noise_multiplier(1.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    with pytest.raises(ValueError, match="count_noise must exceed 0.5"):
        AdaptiveClipping(count_noise=0.4).update_noise_multiplier(1.0)


def test_state_round_trips_with_the_inner_strategy():
    private = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, expected_clients=2,
                                  adaptive=AdaptiveClipping(count_noise=5.0), seed=1)  # fmt: skip
    updates = [ClientUpdate(torch.randn(5), 1) for _ in range(2)]
    private.aggregate(torch.zeros(5), updates)
    resumed = DifferentialPrivacy(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, expected_clients=2,
                                  adaptive=AdaptiveClipping(count_noise=5.0), seed=1)  # fmt: skip
    resumed.load_state_dict(private.state_dict())
    assert resumed.clip_norm == private.clip_norm != 1.0
    assert torch.equal(resumed.aggregate(torch.zeros(5), updates), private.aggregate(torch.zeros(5), updates))


def test_a_client_clips_and_adds_its_noise_share_from_unpredictable_randomness():
    from fedlm.client import FedClient

    delta = torch.full((100_000,), 0.01)  # norm 3.16, clipped to 1
    first, second = FedClient._privatize(delta, 1.0, 0.2), FedClient._privatize(delta, 1.0, 0.2)
    clipped = delta / float(delta.norm())
    assert float((first - clipped).std()) == pytest.approx(0.2, rel=0.02)
    assert float((first - clipped).mean()) == pytest.approx(0.0, abs=0.005)
    assert not torch.equal(first, second)  # not from a seed the server could know


def test_with_noise_on_the_clients_the_server_sums_without_clipping_again():
    # the clients clipped and noised: a noised update's norm is mostly noise, and clipping it again
    # would shrink the noise the accountant counts on
    private = DifferentialPrivacy(noise_multiplier=1.0, clip_norm=1.0, expected_clients=4, noise="clients")
    vectors = [torch.full((100,), 3.0), torch.full((100,), -1.0)]  # norms 30 and 10
    torch.testing.assert_close(private.private_mean(vectors), torch.full((100,), 0.5))


def test_dropouts_under_client_side_noise_lower_the_rounds_noise_multiplier():
    private = DifferentialPrivacy(noise_multiplier=1.2, clip_norm=1.0, expected_clients=8, noise="clients")
    assert private.round_noise_multiplier(8) == 1.2
    assert private.round_noise_multiplier(6) == pytest.approx(1.2 * math.sqrt(6 / 8))  # 6 shares of variance 1/8
    server_side = DifferentialPrivacy(noise_multiplier=1.2, clip_norm=1.0, expected_clients=8)
    assert server_side.round_noise_multiplier(6) == 1.2  # the server adds all of it
    with pytest.raises(ValueError, match="adaptive clipping counts the updates the server clipped"):
        DifferentialPrivacy(noise_multiplier=1.0, clip_norm=1.0, expected_clients=8, noise="clients",
                            adaptive=AdaptiveClipping())  # fmt: skip
