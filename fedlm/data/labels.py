"""The federation's label map: raw label values to class ids, owned by the server."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedlm.errors import DatasetError

MAX_LABELS = 10_000
MAX_WIRE_LABELS = 100_000  # label keys one client may report over the wire, whatever a run's max_labels
"""The most classes a label map may hold by default: a label column that holds ids like 50000, or free
text, would otherwise silently make a head of tens of thousands of classes."""

INTEGER_LABEL = re.compile(r"0|-?[1-9][0-9]*")
"""An integer label as label_key writes it: ASCII digits, no leading zeros (so "7" and "07" never share id 7)."""


def label_key(value: Any) -> str:
    """Labels are compared as strings, so 3, "3" and 3.0 from CSV, JSON and Parquet agree."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


@dataclass(frozen=True)
class LabelMap:
    """Maps each label's string key to a class id 0..num_labels-1."""

    label2id: dict[str, int]

    @classmethod
    def from_values(cls, values: Iterable[Any], max_labels: int = MAX_LABELS) -> LabelMap:
        """Integer labels keep their value as the id; other labels get ids in sorted order.

        Integer labels are class ids, so each must lie in 0..max_labels-1: label 50000 would make a
        50,001-class head, and a negative id names no class. At most `max_labels` distinct labels.
        """
        keys = sorted({label_key(value) for value in values})
        if len(keys) > max_labels:
            raise DatasetError(
                f"the labels hold {len(keys)} distinct values (such as {keys[:3]}), more than max_labels={max_labels}; "
                f"check that the label column holds class labels, or raise max_labels"
            )
        if keys and all(INTEGER_LABEL.fullmatch(key) for key in keys):
            label2id = {key: int(key) for key in keys}
            lowest, highest = min(label2id.values()), max(label2id.values())
            if lowest < 0:
                raise DatasetError(
                    f"label {lowest} is negative, and integer labels are used as class ids 0..N-1: number the "
                    f"classes 0..N-1, use string labels, or drop the rows whose label {lowest} marks no class"
                )
            if highest >= max_labels:
                raise DatasetError(
                    f"label {highest} is not below max_labels={max_labels}: integer labels are used as class ids, so "
                    f"it would make a {highest + 1}-class head. Number the classes 0..N-1, use string labels (such "
                    f"as 'class_{highest}'), or raise max_labels"
                )
            return cls(label2id)
        return cls({key: index for index, key in enumerate(keys)})

    @property
    def id2label(self) -> dict[int, str]:
        return {index: key for key, index in self.label2id.items()}

    @property
    def num_labels(self) -> int:
        return max(self.label2id.values(), default=-1) + 1

    def encode(self, labels: list[Any], owner: str) -> list[int]:
        ids = []
        for value in labels:
            key = label_key(value)
            if key not in self.label2id:
                raise DatasetError(
                    f"{owner}: label {key!r} is not in the federation's label map; valid labels are {sorted(self.label2id)}"
                )
            ids.append(self.label2id[key])
        return ids

    def check_fits(self, num_labels: int, owner: str) -> None:
        """Raise unless every class id is below the model's `num_labels`."""
        bad = sorted(key for key, index in self.label2id.items() if not 0 <= index < num_labels)
        if bad:
            raise DatasetError(
                f"{owner}: labels {bad} fall outside the model's {num_labels} classes (ids 0..{num_labels - 1}); "
                f"load the model with num_labels={max(self.num_labels, len(self.label2id))} or fix the labels"
            )
