"""Task: what a federation trains and measures, from reading the rows to the headline metric.

A task is one file with a `Task` subclass and one registry line (`fedlm.tasks.TASKS`, or
`fedlm.register_task` from a plug-in). The federation's *metadata* is what every participant must
agree on to encode targets the same way (classification: the label map; a task may have none):
each client reports `target_keys` of its data, the server joins them with `metadata`, and sends
the result to the clients (`metadata_to_json` on the wire, `metadata_from_json` on the node).
The loss is the model's own (`model(**batch).loss`): `load_model` chooses a head that computes it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from fedlm.data.dataset import TextDataset
from fedlm.tasks.text import EncodedDataset, encode


class Task(ABC):
    """One kind of training: how rows are read, targets encoded, models loaded and measured.

    `kind` is its name in configs (`task: {kind: ...}`); `metrics` are what `evaluate` reports
    besides "loss" and what the round records summarize over the clients' test splits; `headline`
    is the one of them a run is judged by. `class_labels`: its targets are classes (label-skew
    partitions and distillation's soft labels need that). `target_dtype`: the dtype of the
    batches' "labels" tensor. `lower_is_better`: the metrics for which a client's lower value is
    the better one (its worst client is then the highest). `ranges`: where a metric's values lie,
    which the reply gate checks (a metric not listed lies in [0, 1])."""

    kind: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    headline: ClassVar[str]
    class_labels: ClassVar[bool] = False
    target_dtype: ClassVar[torch.dtype] = torch.long
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    ranges: ClassVar[dict[str, tuple[float, float]]] = {}

    @abstractmethod
    def read(
        self, dataset: Any, text_column: str | None = None, target_column: str | None = None, owner: str = "dataset"
    ) -> TextDataset:
        """`dataset` (a path, a `datasets.Dataset`, a list of dicts, or a TextDataset) as texts and
        raw targets, each target checked (`fedlm.data.dataset.load_text_dataset` reads the rows);
        errors name `owner` and the row."""

    @abstractmethod
    def load_model(self, name_or_path: str, metadata: Any, seed: int) -> torch.nn.Module:
        """A pretrained model (a bundled name or a folder) with this task's head, fitted to the
        federation's `metadata` and initialised from `seed`; its forward pass returns the loss. A
        task whose config section is `quantizable` also takes `from_pretrained` options for a
        quantized base (`fedlm.models.loading.quantized_loading`)."""

    @abstractmethod
    def check_model(self, model: torch.nn.Module, metadata: Any, owner: str) -> None:
        """Raise (a FedlmError naming `owner`) unless `model`'s head fits `metadata`."""

    @abstractmethod
    def evaluate(
        self, model: torch.nn.Module, data: EncodedDataset, batch_size: int, pad_id: int, device: str = "cpu"
    ) -> dict[str, float]:
        """{"loss": ..., and one value per name in `metrics`} of `model` on `data`."""

    def metric_ranges(self) -> dict[str, tuple[float, float]]:
        """(low, high) of each of `metrics`."""
        return {metric: self.ranges.get(metric, (0.0, 1.0)) for metric in self.metrics}

    def target_keys(self, targets: list[Any]) -> list[str]:
        """What a client reports about its targets so that the server can build the metadata
        (sorted, distinct strings). A task without metadata reports nothing."""
        return []

    def metadata(self, target_keys: Iterable[str]) -> Any:
        """The federation's metadata from every client's `target_keys` (None: the task has none)."""
        return None

    def metadata_from_model(self, model: torch.nn.Module) -> Any:
        """The metadata `model` already carries (classification: its own label names), or None."""
        return None

    def metadata_to_json(self, metadata: Any) -> Any:
        """`metadata` as a JSON value, for messages and fedlm.json."""
        return None

    def metadata_from_json(self, value: Any) -> Any:
        """The metadata `metadata_to_json` wrote."""
        return None

    def encode_targets(self, metadata: Any, targets: list[Any], owner: str) -> list[Any]:
        """Raw targets as the values batches hold (classification: class ids); a target the
        metadata does not know raises, naming `owner`."""
        return list(targets)

    def annotate_model(self, model: torch.nn.Module, metadata: Any) -> None:
        """Write `metadata` into `model`'s config before it is saved (classification: its
        id2label and label2id). Nothing to write by default."""
        return None

    def encode(
        self, tokenizer: Any, texts: list[str], targets: list[Any], max_length: int, owner: str = "dataset"
    ) -> EncodedDataset:
        """`texts` tokenized (capped at `max_length` tokens) with their encoded `targets`; errors
        name `owner`. A task may skip rows that cannot be learned from at that length, counted in
        the result's `skipped`."""
        return encode(tokenizer, texts, targets, max_length, self.target_dtype)

    def sample_prompts(self, data: TextDataset, seed: int) -> list[dict[str, Any]]:
        """A fixed set of prompts from `data` (drawn with `seed`) whose responses the global model
        generates after every round (`generate`), as JSON objects with the "reference" response
        where the data has one. A task that does not generate text has none."""
        return []

    def generate(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[dict[str, Any]], max_length: int, device: str
    ) -> list[str]:
        """`model`'s response to each of `sample_prompts`'s prompts (deterministic: greedy decoding)."""
        raise NotImplementedError(f"task {self.kind} does not generate text, so it has no sample prompts")

    def score_samples(self, prompts: list[dict[str, Any]], responses: list[str]) -> list[dict[str, float]]:
        """Each response's scores against its prompt's "reference" (e.g. {"rouge_l": 0.4}); none by
        default."""
        return [{} for _ in responses]
