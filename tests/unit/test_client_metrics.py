import numpy as np
import pytest

from fedlm.core.client_metrics import metric_distribution


def test_distribution_matches_hand_computation():
    values, weights = [0.5, 1.0, 0.8, 0.9], [10, 30, 20, 40]
    result = metric_distribution(values, weights)
    assert result["mean"] == pytest.approx(0.8)
    assert result["weighted_mean"] == pytest.approx((5 + 30 + 16 + 36) / 100)
    assert result["worst"] == 0.5
    # sorted [0.5, 0.8, 0.9, 1.0]: the 10th percentile sits at position 0.3 -> 0.5 + 0.3 * 0.3
    assert result["p10"] == pytest.approx(0.59)
    assert result["std"] == pytest.approx(np.sqrt(((0.5 - 0.8) ** 2 + 0.2**2 + 0 + 0.1**2) / 4))


def test_lower_is_better_metrics_take_the_maximum_as_worst():
    result = metric_distribution([1.0, 3.0], [1, 1], higher_is_better=False)
    assert result["worst"] == 3.0 and result["p10"] == pytest.approx(2.8)


def test_no_values_is_an_error():
    with pytest.raises(ValueError):
        metric_distribution([], [])
