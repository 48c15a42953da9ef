"""A client's text dataset, loaded from any of the sources users have at hand."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlm.errors import DatasetError

TEXT_ALIASES = ("text", "sentence", "content", "document", "review", "body", "article", "utterance")
LABEL_ALIASES = ("label", "labels", "category", "class", "target", "topic", "sentiment", "intent")
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class TextDataset:
    """Texts and their raw labels (as found in the source), the source's other columns
    (for natural splits by author, language, ...), and where they came from."""

    texts: list[str]
    labels: list[Any]
    source: str
    columns: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextDataset:
        return TextDataset(
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            self.source,
            {name: [values[i] for i in indices] for name, values in self.columns.items()},
        )

    def column(self, name: str, owner: str = "dataset") -> list:
        """The values of column `name` ("label" and "text" included)."""
        if name in self.columns:
            return self.columns[name]
        if name in ("label", "text"):
            return self.labels if name == "label" else self.texts
        raise DatasetError(
            f"{owner}: {self.source} has no column {name!r}; its columns are {sorted(['text', 'label', *self.columns])}"
        )


def concatenate(parts: list[TextDataset], source: str) -> TextDataset:
    """One dataset holding `parts` in order; columns missing from a part are filled with None."""
    names = sorted({name for part in parts for name in part.columns})
    return TextDataset(
        [text for part in parts for text in part.texts],
        [label for part in parts for label in part.labels],
        source,
        {name: [value for part in parts for value in part.columns.get(name, [None] * len(part))] for name in names},
    )


def load_text_dataset(
    dataset: Any, text_column: str | None = None, label_column: str | None = None, owner: str = "dataset"
) -> TextDataset:
    """Load `dataset` (a path, a `datasets.Dataset`, a list of dicts, or a TextDataset).

    `owner` names the client (or "validation set") in error messages.
    """
    if isinstance(dataset, TextDataset):
        return dataset
    source, columns = _read_columns(dataset, owner)
    text_name = _pick_column(columns, text_column, TEXT_ALIASES, "text", owner, source)
    label_name = _pick_column(columns, label_column, LABEL_ALIASES, "label", owner, source)
    texts, labels = columns[text_name], columns[label_name]
    if len(texts) == 0:
        raise DatasetError(f"{owner}: {source} holds no examples; every client needs at least one")
    for row, (text, label) in enumerate(zip(texts, labels)):
        if not isinstance(text, str) or label is None or label == "":
            raise DatasetError(
                f"{owner}: {source} row {row}: text must be a string and label non-empty, "
                f"got text={text!r:.60} label={label!r}"
            )
    others = {name: list(values) for name, values in columns.items() if name not in (text_name, label_name)}
    return TextDataset(list(texts), list(labels), source, others)


def load_public_set(
    dataset: Any, text_column: str | None = None, label_column: str | None = None, owner: str = "public set"
) -> TextDataset:
    """A public (proxy) set for distillation: like `load_text_dataset`, but labels are optional
    (then every label is None) and a plain list of strings is texts."""
    if isinstance(dataset, TextDataset):
        return dataset
    if isinstance(dataset, list) and all(isinstance(text, str) for text in dataset):
        dataset = [{"text": text} for text in dataset]
    source, columns = _read_columns(dataset, owner)
    text_name = _pick_column(columns, text_column, TEXT_ALIASES, "text", owner, source)
    has_label = label_column is not None or any(name.lower() in LABEL_ALIASES for name in columns)
    texts = columns[text_name]
    labels = columns[_pick_column(columns, label_column, LABEL_ALIASES, "label", owner, source)] if has_label else None
    if len(texts) == 0:
        raise DatasetError(f"{owner}: {source} holds no examples")
    bad = next((row for row, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise DatasetError(f"{owner}: {source} row {bad}: text must be a string, got {texts[bad]!r:.60}")
    return TextDataset(list(texts), list(labels) if labels is not None else [None] * len(texts), source)


def _read_columns(dataset: Any, owner: str) -> tuple[str, dict[str, list]]:
    """Where `dataset` comes from, and its columns."""
    if isinstance(dataset, (str, Path)):
        return str(dataset), _read_path(Path(dataset), owner)
    if isinstance(dataset, list):
        return "list of records", _records_to_columns(dataset, owner, "list of records")
    if hasattr(dataset, "column_names") and hasattr(dataset, "to_dict"):
        return "datasets.Dataset", dataset.to_dict()
    raise DatasetError(
        f"{owner}: dataset of type {type(dataset).__name__} is not supported; give a file path "
        f"({', '.join(FILE_SUFFIXES)} or a datasets.save_to_disk folder), a datasets.Dataset, or a list of dicts"
    )


def _read_path(path: Path, owner: str) -> dict[str, list]:
    if not path.exists():
        raise DatasetError(f"{owner}: dataset file {path} does not exist")
    try:
        if path.is_dir():
            return _read_saved_dataset(path, owner)
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return _read_delimited(path, "\t" if suffix == ".tsv" else ",", owner)
        if suffix in (".jsonl", ".json"):
            return _records_to_columns(_read_json_records(path), owner, str(path))
        if suffix == ".parquet":
            import pyarrow.parquet

            return pyarrow.parquet.read_table(path).to_pydict()
    except DatasetError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DatasetError(f"{owner}: cannot read dataset file {path}: {error}") from error
    raise DatasetError(
        f"{owner}: dataset file {path} has an unsupported type {path.suffix!r}; "
        f"use one of {', '.join(FILE_SUFFIXES)} or a datasets.save_to_disk folder"
    )


def _read_delimited(path: Path, delimiter: str, owner: str) -> dict[str, list]:
    """Columns straight from the rows (no dict per row: a million-row file stays small)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{owner}: dataset file {path} holds no rows")
        columns: list[list] = [[] for _ in header]
        for row in reader:
            if len(row) != len(header):
                raise ValueError(f"line {reader.line_num} has {len(row)} fields, the header has {len(header)}")
            for values, value in zip(columns, row):
                values.append(value)
    if not columns or not columns[0]:
        raise DatasetError(f"{owner}: dataset file {path} holds no rows")
    return dict(zip(header, columns))


def _read_json_records(path: Path) -> Iterator[dict]:
    """JSON Lines one line at a time, or a JSON array of objects."""
    with path.open(encoding="utf-8") as handle:
        first = handle.read(1)
        while first.isspace():
            first = handle.read(1)
        handle.seek(0)
        if path.suffix.lower() == ".json" and first == "[":
            yield from json.load(handle)
            return
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"line {number} is not valid JSON ({error.msg})") from error


def _read_saved_dataset(path: Path, owner: str) -> dict[str, list]:
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise DatasetError(f"{owner}: folder {path} is not a datasets.save_to_disk folder (no dataset_info.json)")
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetError(f"{owner}: {path} is a DatasetDict without a 'train' split (has {list(loaded)})")
        loaded = loaded["train"]
    return loaded.to_dict()


def _records_to_columns(records: Iterable, owner: str, source: str) -> dict[str, list]:
    """Columns from one dict per example; a key missing from a record reads as None."""
    columns: dict[str, list] = {}
    count = 0
    for record in records:
        if not isinstance(record, dict):
            raise DatasetError(
                f"{owner}: {source} must hold one object (dict) per example, example {count} is {type(record).__name__}"
            )
        for name in record.keys() - columns.keys():
            columns[name] = [None] * count
        for name, values in columns.items():
            values.append(record.get(name))
        count += 1
    if count == 0:
        raise DatasetError(f"{owner}: {source} holds no examples; every client needs at least one")
    return columns


def _pick_column(columns: dict, given: str | None, aliases: tuple[str, ...], role: str, owner: str, source: str) -> str:
    if given is not None:
        if given not in columns:
            raise DatasetError(f"{owner}: {source} has no {role} column {given!r}; its columns are {sorted(columns)}")
        return given
    by_lower = {name.lower(): name for name in columns}
    for alias in aliases:
        if alias in by_lower:
            return by_lower[alias]
    raise DatasetError(
        f"{owner}: {source} has no {role} column; its columns are {sorted(columns)}. "
        f"Name one with {role}_column=..., or use one of {list(aliases)}"
    )
