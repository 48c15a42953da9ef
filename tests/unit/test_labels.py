import pytest

from fedlm.errors import DatasetError
from fedlm.tasks.classification import LabelMap


def test_string_labels_get_ids_in_sorted_order():
    label_map = LabelMap.from_values(["sport", "business", "tech", "sport"])
    assert label_map.label2id == {"business": 0, "sport": 1, "tech": 2}
    assert label_map.id2label == {0: "business", 1: "sport", 2: "tech"}
    assert label_map.encode(["tech", "business"], owner="c") == [2, 0]


def test_integer_labels_keep_their_value_whatever_the_file_format():
    label_map = LabelMap.from_values([0, "2", 1.0])
    assert label_map.label2id == {"0": 0, "1": 1, "2": 2}
    assert label_map.encode([2, "0", 1.0], owner="c") == [2, 0, 1]
    assert LabelMap.from_values([4]).num_labels == 5


def test_unknown_label_names_the_owner_and_the_valid_labels():
    with pytest.raises(DatasetError, match=r"client a: label 'weather' .* valid labels are \['business', 'sport'\]"):
        LabelMap.from_values(["sport", "business"]).encode(["weather"], owner="client a")


def test_labels_outside_the_model_classes_are_rejected():
    label_map = LabelMap.from_values([0, 1, 7])
    label_map.check_fits(8, owner="c")
    with pytest.raises(
        DatasetError, match=r"client b: labels \['7'\] fall outside the model's 3 classes.*num_labels=8"
    ):
        label_map.check_fits(3, owner="client b")


def test_an_integer_label_at_or_above_max_labels_is_rejected():
    with pytest.raises(
        DatasetError, match=r"label 50000 is not below max_labels=10000.*50001-class head.*0..N-1.*string labels"
    ):
        LabelMap.from_values([0, 1, "50000"])
    assert LabelMap.from_values([0, 9_999]).num_labels == 10_000
    assert LabelMap.from_values([0, 5], max_labels=6).num_labels == 6
    with pytest.raises(DatasetError, match=r"label 6 is not below max_labels=6"):
        LabelMap.from_values([0, 6], max_labels=6)


def test_negative_integer_labels_are_rejected():
    with pytest.raises(DatasetError, match=r"label -1 is negative.*class ids 0..N-1.*drop the rows whose label -1"):
        LabelMap.from_values([-1, 0, 1])


def test_more_distinct_labels_than_max_labels_are_rejected():
    with pytest.raises(DatasetError, match=r"the labels hold 10001 distinct values .* more than max_labels=10000"):
        LabelMap.from_values(f"text {index}" for index in range(10_001))
    with pytest.raises(DatasetError, match=r"3 distinct values .* max_labels=2"):
        LabelMap.from_values(["a", "b", "c"], max_labels=2)


def test_only_plain_ascii_integers_are_used_as_ids():
    """Labels such as "07" (which would share id 7 with "7") and "²" (not an int) get ids in sorted order."""
    assert LabelMap.from_values(["7", "07"]).label2id == {"07": 0, "7": 1}
    assert LabelMap.from_values(["²", "1"]).label2id == {"1": 0, "²": 1}
