"""The federation's label map: raw label values to class ids, owned by the server."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedlm.errors import DatasetError


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
    def from_values(cls, values: Iterable[Any]) -> LabelMap:
        """Integer labels keep their value as the id; other labels get ids in sorted order."""
        keys = sorted({label_key(value) for value in values})
        if keys and all(key.lstrip("-").isdigit() for key in keys):
            return cls({key: int(key) for key in keys})
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
