"""Text classification: one class per text, the federation's label map, a sequence-classification
head (cross-entropy), accuracy and macro-F1."""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedlm.data.dataset import LABEL_ALIASES, TextDataset, load_text_dataset, value_key
from fedlm.errors import DatasetError
from fedlm.models.loading import load_pretrained
from fedlm.tasks.base import Task
from fedlm.tasks.text import EncodedDataset, batches

MAX_LABELS = 10_000
"""The most classes a label map may hold by default: a label column that holds ids like 50000, or free
text, would otherwise silently make a head of tens of thousands of classes."""

INTEGER_LABEL = re.compile(r"0|-?[1-9][0-9]*")
"""An integer label as label_key writes it: ASCII digits, no leading zeros (so "7" and "07" never share id 7)."""

label_key = value_key
"""Labels are compared as strings, so 3, "3" and 3.0 from CSV, JSON and Parquet agree."""


@dataclass(frozen=True)
class LabelMap:
    """The federation's label map, owned by the server: each label's string key to a class id
    0..num_labels-1."""

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


def load_classifier(name_or_path: str, num_labels: int, seed: int) -> torch.nn.Module:
    """A sequence classifier from a bundled name or folder; a new head is initialised from `seed`."""
    from transformers import AutoModelForSequenceClassification

    return load_pretrained(AutoModelForSequenceClassification, name_or_path, seed, num_labels=num_labels)


def classification_metrics(predictions: list[int], labels: list[int]) -> dict[str, float]:
    """Accuracy and macro-F1; macro-F1 averages over the classes present in labels or predictions
    (scikit-learn's default), a class with no true or predicted positives scoring 0."""
    if not labels:
        raise ValueError("cannot compute metrics on zero examples")
    correct = sum(p == y for p, y in zip(predictions, labels))
    f1_scores = []
    for cls in sorted(set(labels) | set(predictions)):
        tp = sum(p == cls and y == cls for p, y in zip(predictions, labels))
        fp = sum(p == cls and y != cls for p, y in zip(predictions, labels))
        fn = sum(p != cls and y == cls for p, y in zip(predictions, labels))
        f1_scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": correct / len(labels), "macro_f1": sum(f1_scores) / len(f1_scores)}


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module, data: EncodedDataset, batch_size: int, pad_id: int, device: str = "cpu"
) -> dict[str, float]:
    """Mean cross-entropy loss, accuracy and macro-F1 of `model` on `data`."""
    was_training = model.training
    model.eval()
    total_loss, predictions = 0.0, []
    for batch in batches(data, batch_size, pad_id):
        batch = {key: value.to(device) for key, value in batch.items()}
        output = model(**batch)
        total_loss += float(output.loss) * len(batch["labels"])
        predictions.extend(output.logits.argmax(dim=-1).tolist())
    model.train(was_training)
    return {"loss": total_loss / len(data), **classification_metrics(predictions, data.labels)}


class LabelMapMetadata:
    """The metadata methods of a task whose metadata is a `LabelMap` (classes, tags): as JSON, and
    written into a model's config (id2label, label2id)."""

    def metadata_to_json(self, metadata: LabelMap) -> dict[str, int]:
        return dict(metadata.label2id)

    def metadata_from_json(self, value: Any) -> LabelMap:
        return LabelMap({str(key): int(index) for key, index in value.items()})

    def annotate_model(self, model: torch.nn.Module, metadata: LabelMap) -> None:
        model.config.id2label = dict(metadata.id2label)
        model.config.label2id = dict(metadata.label2id)


class ClassificationTask(LabelMapMetadata, Task):
    """Sequence classification: a label column (detected by name: label, category, topic, ...)
    whose values are classes; the metadata is the federation's `LabelMap` of at most
    `max_labels` classes (a run's `data.max_labels`)."""

    kind: ClassVar[str] = "classification"
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1")
    headline: ClassVar[str] = "accuracy"
    class_labels: ClassVar[bool] = True

    def __init__(self, max_labels: int = MAX_LABELS) -> None:
        self.max_labels = max_labels

    def read(
        self, dataset: Any, text_column: str | None = None, target_column: str | None = None, owner: str = "dataset"
    ) -> TextDataset:
        data = load_text_dataset(dataset, text_column, target_column, owner, LABEL_ALIASES)
        for row, label in enumerate(data.labels):
            if not isinstance(label, (str, numbers.Number)):
                raise DatasetError(
                    f"{owner}: {data.source} row {row}: the label must be one string or number (each example has one "
                    f"class), got a {type(label).__name__}: {label!r:.60}"
                )
        return data

    def target_keys(self, targets: list[Any]) -> list[str]:
        return sorted({label_key(value) for value in targets})

    def metadata(self, target_keys: Iterable[str]) -> LabelMap:
        return LabelMap.from_values(target_keys, self.max_labels)

    def metadata_from_model(self, model: torch.nn.Module) -> LabelMap | None:
        """The model's own label names, when it has real ones (not transformers' LABEL_0, ...)."""
        configured = getattr(model.config, "label2id", None) or {}
        if configured and not all(key.startswith("LABEL_") for key in configured):
            return LabelMap({str(key): int(value) for key, value in configured.items()})
        return None

    def encode_targets(self, metadata: LabelMap, targets: list[Any], owner: str) -> list[int]:
        return metadata.encode(targets, owner)

    def load_model(self, name_or_path: str, metadata: LabelMap, seed: int) -> torch.nn.Module:
        return load_classifier(name_or_path, metadata.num_labels, seed)

    def check_model(self, model: torch.nn.Module, metadata: LabelMap, owner: str) -> None:
        metadata.check_fits(model.config.num_labels, owner)

    def evaluate(
        self, model: torch.nn.Module, data: EncodedDataset, batch_size: int, pad_id: int, device: str = "cpu"
    ) -> dict[str, float]:
        return evaluate_model(model, data, batch_size, pad_id, device)
