"""The learning rate across rounds against hand computations."""

import math

import pytest

from fedlm.core.schedule import LearningRateSchedule


def test_linear_and_cosine_anneal_from_the_learning_rate_and_reach_the_minimum_after_the_last_round():
    linear = LearningRateSchedule("linear", 1e-3, 1e-4, rounds=3)
    assert [linear(r) for r in (1, 2, 3, 4)] == pytest.approx([1e-3, 7e-4, 4e-4, 1e-4])
    cosine = LearningRateSchedule("cosine", 1e-3, 0.0, rounds=4)
    # 0.5 * 1e-3 * (1 + cos(pi * (r - 1) / 4))
    expected = [1e-3, 0.5e-3 * (1 + math.sqrt(0.5)), 0.5e-3, 0.5e-3 * (1 - math.sqrt(0.5)), 0.0]
    assert [cosine(r) for r in range(1, 6)] == pytest.approx(expected, abs=1e-15)
    assert cosine(9) == 0.0  # past the end: the minimum
    assert {LearningRateSchedule("constant", 2e-5, 0.0, rounds=5)(r) for r in range(1, 6)} == {2e-5}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("step", 1e-3, 0.0, 3), "must be one of \\['constant', 'linear', 'cosine'\\]"),
        (("linear", 1e-3, 2e-3, 3), "min_learning_rate 0.002 must lie in \\[0, learning_rate 0.001\\]"),
        (("cosine", 1e-3, 0.0, 0), "rounds must be >= 1"),
    ],
)
def test_a_schedule_that_cannot_anneal_is_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        LearningRateSchedule(*arguments)
