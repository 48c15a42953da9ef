"""Distillation math against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedlm.core.distillation import (
    aggregate_soft_labels,
    distillation_loss,
    merge_top_k,
    soften,
    sparse_distillation_loss,
)


def test_temperature_softens_by_dividing_the_logits():
    e = math.e
    assert soften(torch.tensor([[2.0, 0.0]]), 2.0)[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)])
    assert soften(torch.tensor([[2.0, 0.0]]), 1.0)[0, 0] > soften(torch.tensor([[2.0, 0.0]]), 4.0)[0, 0] > 0.5
    with pytest.raises(ValueError, match="temperature must be > 0"):
        soften(torch.zeros(1, 2), 0.0)


def test_soft_labels_weighted_by_examples_confidence_and_entropy():
    one_hot, other = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert aggregate_soft_labels([one_hot, other], [1, 3])[0].tolist() == pytest.approx([0.25, 0.75])
    # confidence: weights 0.9 / 1.5 and 0.6 / 1.5
    sure, unsure = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.6, 0.4]])
    expected = [0.6 * 0.9 + 0.4 * 0.6, 0.6 * 0.1 + 0.4 * 0.4]
    assert aggregate_soft_labels([sure, unsure], [1, 100], "confidence")[0].tolist() == pytest.approx(expected)
    # entropy: a one-hot client has weight 1, a uniform one (entropy log 2) almost none
    uniform = torch.tensor([[0.5, 0.5]])
    assert aggregate_soft_labels([one_hot, uniform], [1, 100], "entropy")[0].tolist() == pytest.approx(
        [1.0, 0.0], abs=1e-5
    )
    # per example: each row is weighted on its own and stays a distribution
    mixed = aggregate_soft_labels(
        [torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0.5, 0.5], [0.0, 1.0]])], [1, 1], "entropy"
    )
    assert mixed.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0], abs=1e-5)
    with pytest.raises(ValueError, match="weighting must be one of"):
        aggregate_soft_labels([one_hot], [1], "votes")


def test_kd_loss_is_t_squared_kl_mixed_with_cross_entropy():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.75, 0.25]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812
    assert float(distillation_loss(student, teacher, 1.0)) == pytest.approx(kl)
    assert float(distillation_loss(student, teacher, 2.0)) == pytest.approx(4 * kl)  # softmax(0 / 2) is the same
    mixed = distillation_loss(student, teacher, 1.0, labels=torch.tensor([0]), hard_label_weight=0.5)
    assert float(mixed) == pytest.approx(0.5 * kl + 0.5 * math.log(2))
    assert float(
        distillation_loss(torch.tensor([[3.0, 1.0]]), soften(torch.tensor([[3.0, 1.0]]), 2.0), 2.0)
    ) == pytest.approx(0, abs=1e-7)


def test_top_k_distributions_merge_by_weight_over_the_union_of_their_tokens():
    # position 0 by hand: A = {3: 0.5, 7: 0.3}, B = {7: 0.6, 9: 0.2}, weighted 1 : 3
    a_tokens, b_tokens = torch.tensor([[3, 7]]), torch.tensor([[9, 7]])
    a_values, b_values = torch.tensor([[0.5, 0.3]]).log(), torch.tensor([[0.2, 0.6]]).log()
    tokens, probabilities = merge_top_k([a_tokens, b_tokens], [a_values, b_values], [1, 3])
    merged = dict(zip(tokens[0].tolist(), probabilities[0].tolist()))
    # 3: 0.25 * 0.5, 7: 0.25 * 0.3 + 0.75 * 0.6, 9: 0.75 * 0.2, then / 0.8
    assert merged == pytest.approx({3: 0.15625, 7: 0.65625, 9: 0.1875})


def test_merged_top_k_equals_the_dense_weighted_mean_restricted_to_the_union():
    generator = torch.Generator().manual_seed(0)
    positions, vocabulary, k, weights = 6, 40, 5, [2.0, 1.0, 5.0]
    tokens, values, dense = [], [], torch.zeros(positions, vocabulary, dtype=torch.float64)
    for weight in weights:
        log_probabilities = torch.log_softmax(3 * torch.randn(positions, vocabulary, generator=generator), dim=-1)
        top = log_probabilities.topk(k, dim=-1)
        tokens.append(top.indices)
        values.append(top.values)
        dense.scatter_add_(1, top.indices, top.values.double().exp() * weight / sum(weights))
    merged_tokens, probabilities = merge_top_k(tokens, values, weights)
    rebuilt = torch.zeros_like(dense).scatter_add_(1, merged_tokens, probabilities)
    assert torch.allclose(rebuilt, dense / dense.sum(dim=1, keepdim=True), atol=1e-12)
    assert ((probabilities > 0).sum(dim=1) == (dense > 0).sum(dim=1)).all()  # padding only at probability 0


def test_sparse_kd_loss_is_the_dense_cross_entropy_on_the_teachers_support():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 30, generator=generator)
    tokens = torch.tensor([[1, 5, 0], [2, 3, 4], [7, 0, 0], [9, 8, 6]])
    probabilities = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]])
    teacher = torch.zeros(4, 30).scatter_add_(1, tokens, probabilities)
    temperature = 2.0
    dense = -(teacher * torch.log_softmax(student / temperature, dim=-1)).sum(dim=-1).mean() * temperature**2
    assert sparse_distillation_loss(student, tokens, probabilities, temperature) == pytest.approx(float(dense))
