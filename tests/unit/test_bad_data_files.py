"""Malformed data files: each one gives a DatasetError naming the client, the file and where in it,
never a traceback from csv, json or pyarrow, and never a silent misreading."""

import io
import json

import pytest

from fedlm.errors import DatasetError
from fedlm.tasks.classification import ClassificationTask

load_text_dataset = ClassificationTask().read  # how a classification client reads its file


def parquet_bytes(columns: dict[str, list], names: list[str]) -> bytes:
    import pyarrow
    import pyarrow.parquet

    sink = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.table(list(columns.values()), names=names), sink)
    return sink.getvalue()


# file name, its bytes (or a function making them), what the error must say after "client a: ..."
BAD_FILES = [
    ("dup.csv", b"text,label,label\nhi,a,b\n", r"dup.csv has more than one column named 'label'; rename or drop"),
    ("dup.tsv", b"text\ttext\tlabel\nhi\tho\ta\n", r"dup.tsv has more than one column named 'text'"),
    (
        "dup.parquet",
        lambda: parquet_bytes({"a": ["hi"], "b": ["ho"], "c": ["x"]}, ["text", "text", "label"]),
        r"dup.parquet has more than one column named 'text'",
    ),
    ("latin1.csv", "text,label\ncafé,a\n".encode("latin-1"), r"latin1.csv: line 2, byte 4, is not UTF-8 .*as UTF-8"),
    ("utf16.csv", "text,label\nhi,a\n".encode("utf-16"), r"utf16.csv: line 1, byte 1, is not UTF-8"),
    ("latin1.jsonl", b'{"text": "a", "label": 1}\n\n{"text": "caf\xe9", "label": 1}\n', r"latin1.jsonl: line 3,"),
    ("number.jsonl", b'{"text": "a", "label": 1}\n3\n', r"number.jsonl: line 2 is a JSON number, not an object"),
    ("list.jsonl", b'["a", 1]\n', r"list.jsonl: line 1 is a JSON array, not an object"),
    ("null.jsonl", b'{"text": "a", "label": 1}\n\nnull\n', r"null.jsonl: line 3 is a JSON null, not an object"),
    (
        "strings.json",
        b'[{"text": "a", "label": 1}, "b"]',
        r"strings.json: element 1 of the JSON array is a JSON string",
    ),
    ("broken.json", b'[{"text": "a", "label": 1},\n{"text": }]', r"broken.json: line 2 is not valid JSON"),
    (
        "object.json",
        json.dumps({"data": [{"text": "a", "label": 1}]}, indent=2).encode(),
        r"object.json: line 1 is not valid JSON .*; a .json file holds a JSON array of objects or JSON Lines",
    ),
    ("garbage.parquet", b"not a parquet file", r"cannot read Parquet file .*garbage.parquet"),
    (
        "open_quote.csv",
        b'text,label\na,x\n"an unclosed quote,y\nb,z\nc,w\n',
        r"open_quote.csv: the row on lines 3-5 \(is a quote left open\?\) has 1 fields, the header has 2",
    ),
    ("list_label.jsonl", b'{"text": "a", "label": [1, 2]}\n', r"list_label.jsonl row 0: the label must be one string"),
    (
        "nan_label.jsonl",
        b'{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n',
        r"nan_label.jsonl row 1: .*non-empty",
    ),
    (
        "blank_label.csv",
        b"text,label\na,x\nb,  \n",
        r"blank_label.csv row 1: text must be a string and label non-empty",
    ),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES, ids=[name for name, _, _ in BAD_FILES])
def test_a_malformed_file_is_a_dataset_error_naming_the_file_and_place(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content() if callable(content) else content)
    with pytest.raises(DatasetError, match=f"^client a: .*{message}"):
        load_text_dataset(path, owner="client a")
