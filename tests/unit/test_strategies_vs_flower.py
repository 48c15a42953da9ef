"""fedlm's strategies against Flower's implementations (flwr, a test-only dependency) on the
same client updates over several rounds. Flower aggregates client *models*; fedlm aggregates
deltas from the global model: the results must agree to float32 tolerance."""

import warnings

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as flower

from fedlm.core import ClientUpdate
from fedlm.core.robust import CoordinateMedian, Krum, TrimmedMean
from fedlm.core.strategies import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

SIZE, CLIENTS, ROUNDS = 257, 7, 4
COUNTS = [3, 9, 1, 4, 4, 12, 6]


def client_deltas(round_number):
    generator = torch.Generator().manual_seed(round_number)
    return [torch.randn(SIZE, generator=generator) * (1 + index) for index in range(CLIENTS)]


def flower_results(global_params, deltas, counts):
    return [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([(global_params + d).numpy()]), n, {}))
        for d, n in zip(deltas, counts)
    ]


def run_both(ours, theirs, counts=COUNTS, before_flower_round=None):
    """Feed both strategies the same rounds; return the two global vectors after each round."""
    ours_w = theirs_w = torch.linspace(-1, 1, SIZE)
    pairs = []
    for round_number in range(1, ROUNDS + 1):
        deltas = client_deltas(round_number)
        ours_w = ours.aggregate(ours_w, [ClientUpdate(d, n) for d, n in zip(deltas, counts)])
        if before_flower_round is not None:
            before_flower_round(theirs, round_number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parameters, _ = theirs.aggregate_fit(round_number, flower_results(theirs_w, deltas, counts), [])
        theirs_w = torch.from_numpy(parameters_to_ndarrays(parameters)[0]).float()
        pairs.append((ours_w.clone(), theirs_w))
    return pairs


def assert_same(pairs):
    for round_number, (ours, theirs) in enumerate(pairs, start=1):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (
            f"round {round_number}: max diff {(ours - theirs).abs().max()}"
        )


def initial():
    return ndarrays_to_parameters([torch.linspace(-1, 1, SIZE).numpy()])


def test_fedavg():
    assert_same(run_both(FedAvg(), flower.FedAvg()))


def test_fedprox_server_side():
    assert_same(run_both(FedProx(mu=0.1), flower.FedProx(proximal_mu=0.1)))


def test_fedavgm():
    ours = FedAvgM(server_lr=0.7, momentum=0.9)
    theirs = flower.FedAvgM(server_learning_rate=0.7, server_momentum=0.9, initial_parameters=initial())
    assert_same(run_both(ours, theirs))


def test_fedadagrad():
    ours = FedAdagrad(server_lr=0.1, beta_1=0.0, tau=1e-3)
    theirs = flower.FedAdagrad(eta=0.1, tau=1e-3, initial_parameters=initial())  # Flower fixes beta_1 = 0
    assert_same(run_both(ours, theirs))


def test_fedyogi():
    ours = FedYogi(server_lr=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)
    theirs = flower.FedYogi(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3, initial_parameters=initial())
    assert_same(run_both(ours, theirs))


def test_fedadam_equals_flower_once_flowers_bias_correction_is_divided_out():
    # Reddi et al. 2021 (Algorithm 2) has no bias correction and fedlm follows the paper. Flower
    # scales the step by sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1)); giving Flower the learning
    # rate that cancels that factor each round must reproduce fedlm exactly.
    eta, beta_1, beta_2 = 0.05, 0.9, 0.99
    ours = FedAdam(server_lr=eta, beta_1=beta_1, beta_2=beta_2, tau=1e-3)
    theirs = flower.FedAdam(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=1e-3, initial_parameters=initial())

    def cancel_bias_correction(strategy, t):
        strategy.eta = eta * (1 - beta_1 ** (t + 1)) / np.sqrt(1 - beta_2 ** (t + 1))

    assert_same(run_both(ours, theirs, before_flower_round=cancel_bias_correction))


def test_coordinate_median():
    assert_same(run_both(FedAvg(robust=CoordinateMedian()), flower.FedMedian()))


def test_coordinate_median_even_number_of_clients():
    ours, theirs = FedAvg(robust=CoordinateMedian()), flower.FedMedian()
    pairs = run_both(ours, theirs, counts=COUNTS)  # 7 clients: odd; now drop one for even
    assert_same(pairs)
    deltas = client_deltas(9)[:6]
    w = torch.zeros(SIZE)
    mine = ours.aggregate(w, [ClientUpdate(d, 1) for d in deltas])
    parameters, _ = theirs.aggregate_fit(9, flower_results(w, deltas, [1] * 6), [])
    assert torch.allclose(mine, torch.from_numpy(parameters_to_ndarrays(parameters)[0]).float(), atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.2, 0.3])
def test_trimmed_mean(beta):
    assert_same(run_both(FedAvg(robust=TrimmedMean(beta)), flower.FedTrimmedAvg(beta=beta)))


def test_krum():
    assert_same(
        run_both(FedAvg(robust=Krum(num_malicious=2)), flower.Krum(num_malicious_clients=2, num_clients_to_keep=0))
    )


def test_multi_krum_with_equal_client_sizes():
    # Blanchard et al. average the m selected updates uniformly, and so does fedlm; Flower weights
    # them by num_examples. With equal sizes the two definitions coincide.
    ours = FedAvg(robust=Krum(num_malicious=2, to_keep=3))
    theirs = flower.Krum(num_malicious_clients=2, num_clients_to_keep=3)
    assert_same(run_both(ours, theirs, counts=[5] * CLIENTS))
