"""Distillation math against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedlm.core.distillation import (
    MaskedSoftLabels,
    aggregate_soft_labels,
    distillation_loss,
    merge_top_k,
    restrict,
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


def test_clients_probabilities_are_restricted_to_their_own_labels():
    mask = torch.tensor([True, True, False])
    assert restrict(torch.tensor([[0.3, 0.1, 0.6]]), mask)[0].tolist() == pytest.approx([0.75, 0.25, 0.0])
    # no mass on its own labels at all: nothing to say between them, uniform over them
    assert restrict(torch.tensor([[0.0, 0.0, 1.0]]), mask)[0].tolist() == [0.5, 0.5, 0.0]


def test_masked_kd_loss_matches_each_client_over_its_own_labels_only():
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # the two-class KL of the test above
    one = MaskedSoftLabels(
        torch.tensor([[[0.75, 0.25, 0.0]]], dtype=torch.float64), torch.tensor([[True, True, False]]),
        torch.ones(1, 1, dtype=torch.float64),
    )  # fmt: skip
    # the student's softmax over classes 0 and 1 renormalised: (0.5, 0.5) whatever class 2's logit is
    for third in (0.0, 5.0, -3.0):
        assert float(distillation_loss(torch.tensor([[1.0, 1.0, third]]), one, 1.0)) == pytest.approx(kl)
    assert float(distillation_loss(torch.tensor([[1.0, 1.0, 0.0]]), one, 2.0)) == pytest.approx(4 * kl)
    # two clients over {0, 1} and {1, 2}, both matched exactly by a student at (0.6, 0.2, 0.2)
    both = MaskedSoftLabels(
        torch.tensor([[[0.75, 0.25, 0.0]], [[0.0, 0.5, 0.5]]], dtype=torch.float64),
        torch.tensor([[True, True, False], [False, True, True]]),
        torch.tensor([[0.8], [0.2]], dtype=torch.float64),
    )
    assert float(distillation_loss(torch.tensor([[0.6, 0.2, 0.2]]).log(), both, 1.0)) == pytest.approx(0, abs=1e-7)
    # a uniform student: KL_A is the two-class KL, KL_B is 0; weighted 0.8 and 0.2
    assert float(distillation_loss(torch.zeros(1, 3), both, 1.0)) == pytest.approx(0.8 * kl)
    # with hard labels: (1 - h) masked KD + h cross-entropy over all classes
    mixed = distillation_loss(torch.zeros(1, 3), both, 1.0, labels=torch.tensor([2]), hard_label_weight=0.5)
    assert float(mixed) == pytest.approx(0.5 * 0.8 * kl + 0.5 * math.log(3))
    # rows are taken together: a batch is a slice of examples
    assert len(both) == 1 and both[[0, 0]].probabilities.shape == (2, 2, 3)


def test_masked_soft_labels_weigh_certainty_over_each_clients_own_labels():
    masks = torch.tensor([[True, True, False], [False, True, True]])
    probabilities = [torch.tensor([[0.5, 0.4, 0.1]]), torch.tensor([[0.0, 0.5, 0.5]])]
    experts = MaskedSoftLabels.of(probabilities, masks, [3, 1], "examples")
    assert experts.probabilities[0, 0].tolist() == pytest.approx([5 / 9, 4 / 9, 0.0])
    assert experts.weights[:, 0].tolist() == pytest.approx([0.75, 0.25])
    assert experts.confidence() == pytest.approx(0.75 * 5 / 9 + 0.25 * 0.5)
    # certainty 1 - H / log 2 over each client's two labels: client 2, uniform over them, has none
    # (the floor of 1e-6), though over all three classes its entropy would be below log 3
    first = 1 - (-(5 / 9) * math.log(5 / 9) - (4 / 9) * math.log(4 / 9)) / math.log(2)
    certainty = MaskedSoftLabels.of(probabilities, masks, [3, 1], "entropy").weights[:, 0]
    assert certainty.tolist() == pytest.approx([first / (first + 1e-6), 1e-6 / (first + 1e-6)])


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
