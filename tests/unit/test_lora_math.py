"""LoRA pairs in a flat vector and the aggregation error of averaging factors, against dense matrices."""

from __future__ import annotations

import math

import torch

from fedlm.core.lora import fold_products, lora_aggregation_error, lora_pairs, svd_refactor
from fedlm.core.params import ParamSpec
from fedlm.core.strategies import FedAvg
from fedlm.core.update import ClientUpdate

SPEC = ParamSpec(
    names=(
        "m.layer.0.query.lora_A.default.weight",
        "m.layer.0.query.lora_B.default.weight",
        "m.classifier.weight",
        "m.layer.1.value.lora_A.default.weight",
        "m.layer.1.value.lora_B.default.weight",
    ),
    shapes=((2, 5), (4, 2), (3, 4), (3, 6), (7, 3)),
)


def test_pairs_locate_each_layers_factors():
    pairs = lora_pairs(SPEC)
    assert [pair.layer for pair in pairs] == ["m.layer.0.query", "m.layer.1.value"]
    assert pairs[0].a == slice(0, 10) and pairs[0].b == slice(10, 18)
    assert pairs[1].a == slice(30, 48) and pairs[1].a_shape == (3, 6) and pairs[1].b == slice(48, 69)
    assert lora_pairs(ParamSpec(("x.lora_B.default.weight",), ((4, 2),))) == []  # A frozen (FFA): no pair


def test_fedit_error_matches_dense_matrices_and_is_zero_when_clients_agree():
    generator = torch.Generator().manual_seed(0)
    global_params = torch.randn(SPEC.numel, generator=generator)
    updates = [ClientUpdate(torch.randn(SPEC.numel, generator=generator), n) for n in (10, 30, 60)]
    new = FedAvg().aggregate(global_params, updates)
    errors = lora_aggregation_error(global_params, new, updates, lora_pairs(SPEC))

    weights = [0.1, 0.3, 0.6]
    squared_diff, squared_exact = 0.0, 0.0
    for layer, (a_range, a_shape, b_range, b_shape) in {
        "m.layer.0.query": ((0, 10), (2, 5), (10, 18), (4, 2)),
        "m.layer.1.value": ((30, 48), (3, 6), (48, 69), (7, 3)),
    }.items():
        clients = [global_params + update.delta for update in updates]
        products = [c[slice(*b_range)].reshape(b_shape) @ c[slice(*a_range)].reshape(a_shape) for c in clients]
        exact = sum(w * p for w, p in zip(weights, products))
        mean_a = sum(w * c[slice(*a_range)].reshape(a_shape) for w, c in zip(weights, clients))
        mean_b = sum(w * c[slice(*b_range)].reshape(b_shape) for w, c in zip(weights, clients))
        difference = exact - mean_b @ mean_a
        assert math.isclose(errors[layer], float(difference.norm() / exact.norm()), rel_tol=1e-5)
        squared_diff += float(difference.square().sum())
        squared_exact += float(exact.square().sum())
    assert math.isclose(errors["overall"], math.sqrt(squared_diff / squared_exact), rel_tol=1e-5)
    assert errors["overall"] > 0.01

    same = [ClientUpdate(updates[0].delta.clone(), n) for n in (10, 30)]
    assert (
        lora_aggregation_error(global_params, FedAvg().aggregate(global_params, same), same, lora_pairs(SPEC))[
            "overall"
        ]
        < 1e-6
    )


def test_svd_refactor_is_the_best_rank_r_approximation_and_beats_averaging_factors():
    generator = torch.Generator().manual_seed(1)
    global_params = torch.randn(SPEC.numel, generator=generator)
    updates = [ClientUpdate(torch.randn(SPEC.numel, generator=generator), n) for n in (10, 30, 60)]
    averaged = FedAvg().aggregate(global_params, updates)
    refactored = svd_refactor(global_params, averaged, updates, lora_pairs(SPEC))
    assert torch.equal(refactored[18:30], averaged[18:30])  # the classifier is left as the strategy set it
    svd_errors = lora_aggregation_error(global_params, refactored, updates, lora_pairs(SPEC))
    fedit_errors = lora_aggregation_error(global_params, averaged, updates, lora_pairs(SPEC))
    for pair in lora_pairs(SPEC):
        exact = sum(
            n
            / 100
            * (
                (global_params + u.delta)[pair.b].reshape(pair.b_shape)
                @ (global_params + u.delta)[pair.a].reshape(pair.a_shape)
            )
            for u, n in zip(updates, (10, 30, 60))
        )
        singular = torch.linalg.svdvals(exact.double())
        rank = pair.a_shape[0]
        eckart_young = float(singular[rank:].square().sum().sqrt() / singular.square().sum().sqrt())
        assert math.isclose(svd_errors[pair.layer], eckart_young, rel_tol=1e-4, abs_tol=1e-9)
        assert svd_errors[pair.layer] <= fedit_errors[pair.layer] + 1e-9


def test_svd_refactor_of_one_client_is_exact():
    generator = torch.Generator().manual_seed(2)
    global_params = torch.randn(SPEC.numel, generator=generator)
    single = [ClientUpdate(torch.randn(SPEC.numel, generator=generator), 5)]
    refactored = svd_refactor(global_params, FedAvg().aggregate(global_params, single), single, lora_pairs(SPEC))
    assert lora_aggregation_error(global_params, refactored, single, lora_pairs(SPEC))["overall"] < 1e-6


def test_stack_folds_the_exact_weighted_product_into_the_base_and_restarts_the_adapter():
    """FLoRA: W + s sum_k w_k B_k A_k, computed densely from each client's factors, for clients
    of ranks 2 and 4 embedded in the rank-4 global layout (zero-padded)."""
    layer = "m.q"
    spec = ParamSpec(
        (f"{layer}.base_layer.weight", f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"),
        ((5, 6), (4, 6), (5, 4)),
    )
    pairs = lora_pairs(spec)
    assert pairs[0].base == slice(0, 30) and pairs[0].base_shape == (5, 6)
    generator = torch.Generator().manual_seed(1)
    initial = torch.randn(spec.numel, generator=generator)
    initial[54:] = 0  # B starts at zero
    factors = []  # (A, B, examples), rank 2 then rank 4
    for rank, examples in ((2, 10), (4, 30)):
        a, b = torch.randn(rank, 6, generator=generator), torch.randn(5, rank, generator=generator)
        factors.append(
            (torch.cat([a, torch.zeros(4 - rank, 6)]), torch.cat([b, torch.zeros(5, 4 - rank)], 1), examples)
        )
    updates = [
        ClientUpdate(torch.cat([initial[:30], a.reshape(-1), b.reshape(-1)]) - initial, examples)
        for a, b, examples in factors
    ]
    folded = fold_products(initial, FedAvg().aggregate(initial, updates), updates, pairs, {layer: 0.5}, initial)
    expected = initial[:30].view(5, 6).double() + 0.5 * sum(n / 40 * (b.double() @ a.double()) for a, b, n in factors)
    assert torch.allclose(folded[:30].view(5, 6).double(), expected, atol=1e-6)
    assert torch.equal(folded[30:], initial[30:])  # A back at its init, B back at zero
    error = lora_aggregation_error(initial, folded, updates, pairs, scalings={layer: 0.5})
    assert error["overall"] < 1e-6  # exact, up to float32 rounding of the base
