"""A client's text dataset, loaded from any of the sources users have at hand."""

from __future__ import annotations

import csv
import json
import numbers
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlm.errors import DatasetError

TEXT_ALIASES = ("text", "sentence", "content", "document", "review", "body", "article", "utterance")
LABEL_ALIASES = ("label", "labels", "category", "class", "target", "topic", "sentiment", "intent")
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
CSV_FIELD_LIMIT = 2**31 - 1  # the largest limit a C long holds on every platform; csv's default is 128 KiB
JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


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
            f"{owner}: {self.source} has no column {name!r}; its columns are "
            f"{sorted(['text', 'label', *self.columns], key=str)}"
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


def value_key(value: Any) -> str:
    """A column value as a string, so that 3, "3" and 3.0 from CSV, JSON and Parquet agree (label
    keys, row fingerprints)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def load_text_dataset(
    dataset: Any,
    text_column: str | None = None,
    label_column: str | None = None,
    owner: str = "dataset",
    label_aliases: tuple[str, ...] = LABEL_ALIASES,
) -> TextDataset:
    """Load `dataset` (a path, a `datasets.Dataset`, a list of dicts, or a TextDataset): its texts,
    and each row's target from `label_column` (or the first column named like one of
    `label_aliases`), which must not be missing. With no `label_column` and no `label_aliases` the
    rows hold only text, and every target is None. What a target may be is the task's to check
    (`fedlm.tasks.Task.read`).

    `owner` names the client (or "validation set") in error messages.
    """
    if isinstance(dataset, TextDataset):
        return dataset
    source, columns = read_columns(dataset, owner)
    text_name = _pick_column(columns, text_column, TEXT_ALIASES, "text", owner, source)
    texts = columns[text_name]
    if label_column is None and not label_aliases:
        label_name, labels = None, [None] * len(texts)
    else:
        label_name = _pick_column(columns, label_column, label_aliases, "label", owner, source)
        labels = columns[label_name]
    if len(texts) == 0:
        raise DatasetError(f"{owner}: {source} holds no examples; every client needs at least one")
    for row, (text, label) in enumerate(zip(texts, labels)):
        if not isinstance(text, str) or (label_name is not None and _is_missing(label)):
            raise DatasetError(
                f"{owner}: {source} row {row}: text must be a string and label non-empty, "
                f"got text={text!r:.60} label={label!r:.60}"
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
    source, columns = read_columns(dataset, owner)
    text_name = _pick_column(columns, text_column, TEXT_ALIASES, "text", owner, source)
    has_label = label_column is not None or any(str(name).lower() in LABEL_ALIASES for name in columns)
    texts = columns[text_name]
    labels = columns[_pick_column(columns, label_column, LABEL_ALIASES, "label", owner, source)] if has_label else None
    if len(texts) == 0:
        raise DatasetError(f"{owner}: {source} holds no examples")
    bad = next((row for row, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise DatasetError(f"{owner}: {source} row {bad}: text must be a string, got {texts[bad]!r:.60}")
    return TextDataset(list(texts), list(labels) if labels is not None else [None] * len(texts), source)


def _is_missing(label: Any) -> bool:
    """None, NaN (how pandas and Arrow write a missing value) and blank strings are no label."""
    if label is None:
        return True
    if isinstance(label, str):
        return not label.strip()
    return isinstance(label, numbers.Number) and label != label  # only NaN differs from itself


@dataclass
class Records:
    """Rows (dicts of column values) with the name of where they come from (a bundled dataset)."""

    rows: list[dict[str, Any]]
    source: str


def read_columns(dataset: Any, owner: str) -> tuple[str, dict[str, list]]:
    """Where `dataset` (a path, a `datasets.Dataset`, `Records` or a list of dicts) comes from,
    and its columns by name; for tasks whose rows are not one text and one target."""
    if isinstance(dataset, (str, Path)):
        return str(dataset), _read_path(Path(dataset), owner)
    if isinstance(dataset, Records):
        return dataset.source, _records_to_columns(dataset.rows, owner, dataset.source)
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
            return _read_parquet(path, owner)
    except DatasetError:
        raise
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{owner}: cannot read dataset file {path}: {_first_non_utf8(path)} is not UTF-8 ({error.reason}); "
            f"save the file as UTF-8 text"
        ) from error
    except (OSError, ValueError) as error:
        raise DatasetError(f"{owner}: cannot read dataset file {path}: {error}") from error
    raise DatasetError(
        f"{owner}: dataset file {path} has an unsupported type {path.suffix!r}; "
        f"use one of {', '.join(FILE_SUFFIXES)} or a datasets.save_to_disk folder"
    )


def _first_non_utf8(path: Path) -> str:
    """Where the first bytes of `path` that are not UTF-8 are, as "line N, byte B" (the decode error's own
    position counts from the chunk being decoded, not from the file). No UTF-8 character spans a newline,
    so each line decodes on its own."""
    if path.is_file():
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as error:
                    return f"line {number}, byte {error.start + 1},"
    return "part of it"


def _read_delimited(path: Path, delimiter: str, owner: str) -> dict[str, list]:
    """Columns straight from the rows (no dict per row: a million-row file stays small). "utf-8-sig"
    drops the byte-order mark Excel writes; fields may be of any size; blank lines are skipped."""
    with path.open(newline="", encoding="utf-8-sig") as handle, _csv_field_limit(CSV_FIELD_LIMIT):
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{owner}: dataset file {path} holds no rows")
            _check_unique_columns(header, path, owner)
            columns: list[list] = [[] for _ in header]
            first_line = reader.line_num + 1  # a quoted field may span lines: where the next row starts
            for row in reader:
                if row and len(row) != len(header):
                    lines = f"line {first_line}"
                    if reader.line_num > first_line:
                        lines = f"the row on lines {first_line}-{reader.line_num} (is a quote left open?)"
                    raise ValueError(f"{lines} has {len(row)} fields, the header has {len(header)}")
                for values, value in zip(columns, row):  # a blank line (row []) adds nothing
                    values.append(value)
                first_line = reader.line_num + 1
        except csv.Error as error:
            raise DatasetError(f"{owner}: cannot read dataset file {path}: line {reader.line_num}: {error}") from error
    if not columns or not columns[0]:
        raise DatasetError(f"{owner}: dataset file {path} holds no rows")
    return dict(zip(header, columns))


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """csv's field size limit is process-wide: raise it while reading, then put the previous one back."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _check_unique_columns(names: list[str], path: Path, owner: str) -> None:
    """Two columns of one name would keep only the last one's values: refuse them."""
    duplicated = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicated:
        raise DatasetError(
            f"{owner}: dataset file {path} has more than one column named {', '.join(map(repr, duplicated))}; "
            f"rename or drop the duplicates so that each column name appears once"
        )


def _read_json_records(path: Path) -> Iterator[dict]:
    """JSON Lines one line at a time, or a JSON array of objects ("utf-8-sig": with or without a byte-order mark)."""
    with path.open(encoding="utf-8-sig") as handle:
        first = handle.read(1)
        while first.isspace():
            first = handle.read(1)
        handle.seek(0)
        if path.suffix.lower() == ".json" and first == "[":
            try:
                records = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"line {error.lineno} is not valid JSON ({error.msg})") from error
            for index, record in enumerate(records):
                if not isinstance(record, dict):
                    raise ValueError(f"element {index} of the JSON array is {_json_type(record)}, not an object")
            yield from records
            return
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    hint = (
                        "; a .json file holds a JSON array of objects or JSON Lines"
                        if path.suffix.lower() == ".json"
                        else ""
                    )
                    raise ValueError(f"line {number} is not valid JSON ({error.msg}){hint}") from error
                if not isinstance(record, dict):
                    raise ValueError(
                        f"line {number} is {_json_type(record)}, not an object; JSON Lines hold one object per line, "
                        'such as {"text": "...", "label": "..."}'
                    )
                yield record


def _json_type(value: Any) -> str:
    return f"a JSON {JSON_TYPES[type(value)]}"


def _read_parquet(path: Path, owner: str) -> dict[str, list]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(path).read()
    except pyarrow.ArrowException as error:
        raise DatasetError(f"{owner}: cannot read Parquet file {path}: {error}") from error
    _check_unique_columns(table.column_names, path, owner)
    return table.to_pydict()


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
            raise DatasetError(
                f"{owner}: {source} has no {role} column {given!r}; its columns are {sorted(columns, key=str)}"
            )
        return given
    by_lower = {str(name).lower(): name for name in columns}
    for alias in aliases:
        if alias in by_lower:
            return by_lower[alias]
    raise DatasetError(
        f"{owner}: {source} has no {role} column; its columns are {sorted(columns, key=str)}. "
        f"Name one with {role}_column=..., or use one of {list(aliases)}"
    )
