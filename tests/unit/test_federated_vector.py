"""The federated vector of a model: its trainable parameters live as views into one flat buffer,
so that getting and setting it is one copy, and it still reads and writes exactly what a
concatenation over the parameters would."""

import torch

from fedlm.models.federated import federated_view, get_federated_vector, set_federated_vector


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)  # frozen: not federated
    return model


def concatenated(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([param.detach().reshape(-1) for param in model.parameters() if param.requires_grad])


def test_the_vector_is_the_trainable_parameters_in_order_and_the_parameters_become_views():
    model = small_model()
    expected = concatenated(model)
    vector = get_federated_vector(model)
    assert torch.equal(vector, expected) and vector.numel() == 4 * 3 + 3 + 3 + 3 * 2 + 2
    view = federated_view(model)
    assert view.data_ptr() == model[0].weight.data_ptr()  # the parameters live in the buffer
    assert vector.data_ptr() != view.data_ptr()  # get_federated_vector copies
    set_federated_vector(model, torch.arange(vector.numel(), dtype=torch.float32))
    assert torch.equal(concatenated(model), torch.arange(vector.numel(), dtype=torch.float32))
    assert torch.equal(model[2].bias, torch.tensor([24.0, 25.0]))
    assert torch.equal(model[1].bias, torch.zeros(3))  # the frozen one untouched


def test_training_through_the_views_moves_the_vector():
    model = small_model()
    before = get_federated_vector(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    assert torch.equal(federated_view(model), concatenated(model))
    assert not torch.equal(federated_view(model), before)


def test_a_replaced_or_recast_parameter_is_seen_and_the_buffer_rebuilt():
    model = small_model()
    federated_view(model)
    model[0].weight.data = torch.full((3, 4), 7.0)  # no longer a view into the buffer
    assert torch.equal(get_federated_vector(model)[:12], torch.full((12,), 7.0))
    model[2].weight.requires_grad_(False)  # a different set of federated parameters
    assert get_federated_vector(model).numel() == 12 + 3 + 3 + 2
    model.double()  # not float32: concatenated, not aliased
    assert get_federated_vector(model).dtype == torch.float32
    assert torch.equal(get_federated_vector(model), concatenated(model).float())
