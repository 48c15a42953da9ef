"""Distillation math against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedlm.core.distillation import aggregate_soft_labels, distillation_loss, soften


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
