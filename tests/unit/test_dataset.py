import csv
import json

import pytest

from fedlm.data import load_text_dataset
from fedlm.errors import DatasetError

RECORDS = [{"sentence": "stocks rise", "category": "business"}, {"sentence": "team wins", "category": "sport"}]


def write_csv(path, records):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def test_every_source_kind_loads_the_same_examples(tmp_path):
    import datasets
    import pyarrow
    import pyarrow.parquet

    csv_path = write_csv(tmp_path / "c.csv", RECORDS)
    jsonl_path = tmp_path / "c.jsonl"
    jsonl_path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps(RECORDS))
    parquet_path = tmp_path / "c.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(RECORDS), parquet_path)
    hf_dataset = datasets.Dataset.from_list(RECORDS)
    hf_dataset.save_to_disk(str(tmp_path / "saved"))
    for source in (csv_path, str(jsonl_path), json_path, parquet_path, tmp_path / "saved", hf_dataset, RECORDS):
        data = load_text_dataset(source)
        assert data.texts == ["stocks rise", "team wins"], source
        assert data.labels == ["business", "sport"], source


def test_tsv_and_explicit_columns(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("body\tlabel\tstars\nnice film\tpos\t5\n")
    data = load_text_dataset(path, text_column="body", label_column="stars")
    assert data.texts == ["nice film"] and data.labels == ["5"]


def test_missing_file_names_the_client_and_path(tmp_path):
    with pytest.raises(DatasetError, match=r"client a: dataset file .*nope.csv does not exist"):
        load_text_dataset(tmp_path / "nope.csv", owner="client a")


def test_missing_text_column_lists_the_columns_that_exist(tmp_path):
    path = write_csv(tmp_path / "c.csv", [{"headline": "x", "label": "y"}])
    with pytest.raises(
        DatasetError, match=r"client a: .*c.csv has no text column; its columns are \['headline', 'label'\]"
    ):
        load_text_dataset(path, owner="client a")
    with pytest.raises(DatasetError, match=r"no label column 'topic'; its columns are \['headline', 'label'\]"):
        load_text_dataset(path, text_column="headline", label_column="topic")


def test_empty_sources_are_rejected(tmp_path):
    (tmp_path / "e.csv").write_text("text,label\n")
    (tmp_path / "e.jsonl").write_text("\n")
    for source in (tmp_path / "e.csv", tmp_path / "e.jsonl", []):
        with pytest.raises(DatasetError, match="client z: .*(no rows|no examples)"):
            load_text_dataset(source, owner="client z")


def test_unreadable_and_unsupported_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{broken\n')
    with pytest.raises(DatasetError, match="cannot read dataset file .*bad.jsonl: line 2 is not valid JSON"):
        load_text_dataset(tmp_path / "bad.jsonl")
    (tmp_path / "c.xlsx").write_text("x")
    with pytest.raises(DatasetError, match=r"unsupported type '.xlsx'"):
        load_text_dataset(tmp_path / "c.xlsx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DatasetError, match="not a datasets.save_to_disk folder"):
        load_text_dataset(tmp_path / "folder")
    with pytest.raises(DatasetError, match="type int is not supported"):
        load_text_dataset(42)


def test_rows_without_text_or_label_are_reported_by_row(tmp_path):
    with pytest.raises(DatasetError, match="row 1: text must be a string and label non-empty"):
        load_text_dataset([{"text": "a", "label": "x"}, {"text": "b", "label": ""}])


def test_ragged_csv_rows_and_jsonl_records_with_missing_keys(tmp_path):
    (tmp_path / "ragged.csv").write_text("text,label\na,x\nb,y,extra\n")
    with pytest.raises(DatasetError, match="ragged.csv: line 3 has 3 fields, the header has 2"):
        load_text_dataset(tmp_path / "ragged.csv")
    (tmp_path / "mixed.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 2, "user": "u7"}\n')
    data = load_text_dataset(tmp_path / "mixed.jsonl")
    assert data.labels == [1, 2] and data.columns == {"user": [None, "u7"]}
