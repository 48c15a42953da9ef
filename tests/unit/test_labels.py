import pytest

from fedlm.data.labels import LabelMap
from fedlm.errors import DatasetError


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
