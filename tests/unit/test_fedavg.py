import numpy as np
import pytest
import torch

from fedlm.core import ClientUpdate
from fedlm.core.aggregate import weighted_mean_delta
from fedlm.core.strategies import STRATEGIES, FedAvg, Strategy, register_strategy


def test_fedavg_matches_hand_computed_weights():
    # n = 1 + 3 = 4, weights 1/4 and 3/4:
    # delta = 1/4 * [1, 2] + 3/4 * [4, -2] = [0.25 + 3, 0.5 - 1.5] = [3.25, -1]
    global_params = torch.tensor([10.0, 20.0])
    updates = [ClientUpdate(torch.tensor([1.0, 2.0]), 1), ClientUpdate(torch.tensor([4.0, -2.0]), 3)]
    new = FedAvg().aggregate(global_params, updates)
    assert torch.allclose(new, torch.tensor([13.25, 19.0]))
    assert torch.equal(global_params, torch.tensor([10.0, 20.0])), "aggregate must not modify its input"


def test_fedavg_is_the_weighted_mean_of_client_models():
    generator = torch.Generator().manual_seed(0)
    global_params = torch.randn(1000, generator=generator)
    client_models = [torch.randn(1000, generator=generator) for _ in range(4)]
    counts = [5, 17, 1, 40]
    updates = [ClientUpdate(model - global_params, n) for model, n in zip(client_models, counts)]
    reference = np.average(np.stack([m.numpy() for m in client_models]), axis=0, weights=counts)
    assert np.allclose(FedAvg().aggregate(global_params, updates).numpy(), reference, atol=1e-5)


def test_server_learning_rate_scales_the_mean_delta():
    updates = [ClientUpdate(torch.tensor([2.0]), 1), ClientUpdate(torch.tensor([4.0]), 1)]
    assert torch.allclose(FedAvg(server_lr=0.5).aggregate(torch.tensor([1.0]), updates), torch.tensor([2.5]))


def test_weighted_mean_rejects_no_updates_and_zero_examples():
    with pytest.raises(ValueError, match="empty"):
        weighted_mean_delta([])
    with pytest.raises(ValueError, match="num_examples is 0"):
        weighted_mean_delta([ClientUpdate(torch.zeros(2), 0)])


def test_fedavg_rejects_a_non_positive_server_lr():
    with pytest.raises(ValueError, match="server_lr"):
        FedAvg(server_lr=0)


def test_fedavg_has_no_state_and_refuses_foreign_state():
    assert FedAvg().state_dict() == {}
    with pytest.raises(ValueError, match="no state"):
        FedAvg().load_state_dict({"momentum": torch.zeros(1)})


def test_registry_rejects_duplicates_and_bad_names():
    assert STRATEGIES["fedavg"] is FedAvg
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("fedavg", FedAvg)
    with pytest.raises(ValueError, match="lowercase identifier"):
        register_strategy("Fed-Avg", Strategy)
