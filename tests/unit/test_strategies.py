"""Every strategy and robust aggregate against hand-computed expectations on small vectors."""

import math

import pytest
import torch

from fedlm.core import ClientUpdate
from fedlm.core.robust import CoordinateMedian, Krum, TrimmedMean, clip_to_norm
from fedlm.core.strategies import STRATEGIES, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Scaffold


def updates(*deltas, counts=None):
    counts = counts or [1] * len(deltas)
    return [ClientUpdate(torch.tensor(d, dtype=torch.float32), n) for d, n in zip(deltas, counts)]


def test_fedavgm_accumulates_momentum():
    strategy = FedAvgM(server_lr=1.0, momentum=0.5)
    w = torch.tensor([0.0])
    w = strategy.aggregate(w, updates([2.0]))  # v = -2, w = 0 + 2 = 2
    assert torch.allclose(w, torch.tensor([2.0]))
    w = strategy.aggregate(w, updates([1.0]))  # v = 0.5 * -2 - 1 = -2, w = 2 + 2 = 4
    assert torch.allclose(w, torch.tensor([4.0]))
    assert torch.allclose(strategy.state_dict()["velocity"], torch.tensor([-2.0]))


def test_fedprox_sends_mu_and_averages_like_fedavg():
    strategy = FedProx(mu=0.1)
    assert strategy.configure_fit(torch.zeros(2)) == ({"proximal_mu": 0.1}, {})
    assert torch.allclose(strategy.aggregate(torch.zeros(1), updates([1.0], [3.0], counts=[1, 3])), torch.tensor([2.5]))


def test_fedadam_two_rounds_by_hand():
    strategy = FedAdam(server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=0.01)
    w = strategy.aggregate(torch.tensor([1.0]), updates([2.0]))
    m, v = 0.1 * 2, 0.01 * 4  # 0.2, 0.04
    expected = 1 + 0.1 * m / (math.sqrt(v) + 0.01)
    assert w.item() == pytest.approx(expected, rel=1e-6)
    w2 = strategy.aggregate(w, updates([-1.0]))
    m, v = 0.9 * m - 0.1, 0.99 * v + 0.01 * 1
    assert w2.item() == pytest.approx(expected + 0.1 * m / (math.sqrt(v) + 0.01), rel=1e-6)


def test_fedadagrad_and_fedyogi_second_moments_by_hand():
    adagrad = FedAdagrad(server_lr=1.0, beta_1=0.0, tau=0.5)
    adagrad.aggregate(torch.tensor([0.0]), updates([3.0]))
    adagrad.aggregate(torch.tensor([0.0]), updates([4.0]))
    assert adagrad.second_moment.item() == pytest.approx(9 + 16)
    yogi = FedYogi(server_lr=1.0, beta_1=0.0, beta_2=0.9, tau=0.5)
    w = yogi.aggregate(torch.tensor([0.0]), updates([2.0]))  # v = 0 - 0.1 * 4 * sign(0 - 4) = 0.4
    assert yogi.second_moment.item() == pytest.approx(0.4)
    assert w.item() == pytest.approx(2 / (math.sqrt(0.4) + 0.5), rel=1e-6)
    yogi.aggregate(w, updates([0.5]))  # v = 0.4 - 0.1 * 0.25 * sign(0.4 - 0.25) = 0.375
    assert yogi.second_moment.item() == pytest.approx(0.375)


def test_scaffold_server_control_and_step():
    strategy = Scaffold(num_clients=4, server_lr=1.0)
    config, tensors = strategy.configure_fit(torch.zeros(2))
    assert config == {"scaffold": True} and torch.equal(tensors["server_control"], torch.zeros(2))
    round_updates = updates([1.0, 0.0], [3.0, 2.0])
    round_updates[0].extras["control_delta"] = torch.tensor([0.4, 0.0])
    round_updates[1].extras["control_delta"] = torch.tensor([0.0, 0.8])
    w = strategy.aggregate(torch.zeros(2), round_updates)
    assert torch.allclose(w, torch.tensor([2.0, 1.0]))
    assert torch.allclose(strategy.server_control, torch.tensor([0.1, 0.2]))  # sum / num_clients
    with pytest.raises(ValueError, match="lack 'control_delta'"):
        strategy.aggregate(w, updates([1.0, 1.0]))


def test_coordinate_median_odd_and_even():
    odd = CoordinateMedian()(updates([1.0, 10.0], [2.0, -5.0], [100.0, 0.0]))
    assert torch.equal(odd, torch.tensor([2.0, 0.0]))
    even = CoordinateMedian()(updates([1.0], [2.0], [4.0], [100.0]))
    assert torch.equal(even, torch.tensor([3.0]))


def test_trimmed_mean_drops_the_extremes():
    # beta 0.2 of 5 clients cuts int(1.0) = 1 from each end: mean(2, 3, 4) = 3
    result = TrimmedMean(beta=0.2)(updates([1.0], [2.0], [3.0], [4.0], [1000.0]))
    assert torch.equal(result, torch.tensor([3.0]))
    assert torch.equal(TrimmedMean(beta=0.1)(updates([1.0], [2.0], [3.0], [4.0], [1000.0])), torch.tensor([202.0]))
    with pytest.raises(ValueError):
        TrimmedMean(beta=0.5)


def test_krum_picks_the_client_closest_to_its_neighbours():
    honest = [[1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1.0, 1.2]]
    attack = [[50.0, -50.0]]
    round_updates = updates(*honest, *attack)
    krum = Krum(num_malicious=1)
    # n - f - 2 = 2 nearest neighbours. Squared distances: ab 0.02, ac 0.02, ad 0.04, bc 0.08, bd 0.10,
    # cd 0.02, so the scores are a 0.04, b 0.10, c 0.04, d 0.06, and the attacker's is huge.
    scores = krum.scores(round_updates)
    assert scores[:4].tolist() == pytest.approx([0.04, 0.10, 0.04, 0.06], abs=1e-6)
    assert scores[4] > 1000
    assert torch.equal(krum(round_updates), torch.tensor([1.0, 1.0]))  # a (ties with c, first wins)
    multi = Krum(num_malicious=1, to_keep=3)(round_updates)  # plain mean of a, c, d
    assert torch.allclose(multi, torch.tensor([(1 + 0.9 + 1) / 3, (1 + 1.1 + 1.2) / 3]))


def test_norm_bounding_scales_only_large_deltas():
    clipped = clip_to_norm(updates([3.0, 4.0], [0.3, 0.4]), max_norm=1.0)
    assert torch.allclose(clipped[0].delta, torch.tensor([0.6, 0.8]))
    assert torch.equal(clipped[1].delta, torch.tensor([0.3, 0.4]))


def test_robust_aggregate_and_clipping_compose_with_any_server_step():
    round_updates = updates([1.0], [2.0], [3.0], [4.0], [1000.0])
    fedavg = FedAvg(robust=TrimmedMean(0.2)).aggregate(torch.tensor([10.0]), round_updates)
    assert torch.equal(fedavg, torch.tensor([13.0]))
    clipped = FedAvg(clip_norm=2.0).aggregate(torch.tensor([0.0]), round_updates)
    assert clipped.item() == pytest.approx((1 + 2 + 2 + 2 + 2) / 5)
    adam = FedAdam(server_lr=1.0, beta_1=0.0, beta_2=0.0, tau=1e-9, robust=CoordinateMedian())
    assert adam.aggregate(torch.tensor([0.0]), round_updates).item() == pytest.approx(1.0, rel=1e-5)  # m / sqrt(m^2)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_dict_round_trips_and_resumes_identically(name):
    make = (lambda: STRATEGIES[name](num_clients=3)) if name == "scaffold" else STRATEGIES[name]
    generator = torch.Generator().manual_seed(0)
    rounds = [
        [
            ClientUpdate(
                torch.randn(50, generator=generator), n, extras={"control_delta": torch.randn(50, generator=generator)}
            )
            for n in (1, 2, 3)
        ]
        for _ in range(4)
    ]
    straight, first_half = make(), make()
    w = w_resumed = torch.zeros(50)
    for round_updates in rounds:
        straight.configure_fit(w)
        w = straight.aggregate(w, round_updates)
    for round_updates in rounds[:2]:
        first_half.configure_fit(w_resumed)
        w_resumed = first_half.aggregate(w_resumed, round_updates)
    resumed = make()
    resumed.load_state_dict({key: value.clone() for key, value in first_half.state_dict().items()})
    for round_updates in rounds[2:]:
        resumed.configure_fit(w_resumed)
        w_resumed = resumed.aggregate(w_resumed, round_updates)
    assert torch.equal(w, w_resumed)
    with pytest.raises(ValueError, match="has no state"):
        make().load_state_dict({"nonsense": torch.zeros(1)})


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 10, 17, 33, 50])
def test_sorting_network_sorts_every_column(count):
    from fedlm.core.robust import _ranked_blocks

    generator = torch.Generator().manual_seed(count)
    deltas = [torch.randn(300, generator=generator) for _ in range(count)]
    deltas[0][:10] = deltas[-1][:10]  # ties
    originals = [d.clone() for d in deltas]
    ((_, _, rows),) = _ranked_blocks([ClientUpdate(d, 1) for d in deltas], range(count))
    assert torch.equal(torch.stack(rows[:count]), torch.stack(originals).sort(dim=0).values)
    middle = range(count // 2, count // 2 + 1)  # a selection network sorts just enough
    ((_, _, rows),) = _ranked_blocks([ClientUpdate(d, 1) for d in deltas], middle)
    assert torch.equal(rows[count // 2], torch.stack(originals).sort(dim=0).values[count // 2])
    assert all(torch.equal(d, o) for d, o in zip(deltas, originals)), "the clients' deltas must not be modified"
