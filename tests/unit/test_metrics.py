import pytest

from fedlm.tasks.classification import classification_metrics


def test_accuracy_and_macro_f1_match_hand_computation():
    labels = [0, 0, 1, 1, 2, 2]
    predictions = [0, 1, 1, 1, 0, 2]
    # class 0: tp 1, fp 1, fn 1 -> F1 = 2/4 = 0.5
    # class 1: tp 2, fp 1, fn 0 -> F1 = 4/5 = 0.8
    # class 2: tp 1, fp 0, fn 1 -> F1 = 2/3
    metrics = classification_metrics(predictions, labels)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_a_predicted_class_that_never_occurs_counts_as_zero_f1():
    # class 0: tp 1, fn 1 -> 2/3; class 1: only a false positive -> 0
    metrics = classification_metrics([0, 1], [0, 0])
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["accuracy"] == 0.5


def test_no_examples_is_an_error():
    with pytest.raises(ValueError):
        classification_metrics([], [])
