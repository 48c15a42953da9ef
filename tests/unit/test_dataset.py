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


def test_csv_fields_of_any_size_load_and_the_process_wide_limit_is_restored(tmp_path):
    limit = csv.field_size_limit()
    big = "word " * 60_000  # 300 KB, over csv's default 128 KiB field limit
    (tmp_path / "big.csv").write_text(f"text,label\n{big},a\nsmall,b\n")
    (tmp_path / "big.tsv").write_text(f"text\tlabel\n{big}\ta\n")
    assert load_text_dataset(tmp_path / "big.csv").texts == [big, "small"]
    assert load_text_dataset(tmp_path / "big.tsv").texts == [big]
    assert csv.field_size_limit() == limit


def test_a_csv_error_names_the_file_and_line(tmp_path, monkeypatch):
    import fedlm.data.dataset

    monkeypatch.setattr(fedlm.data.dataset, "CSV_FIELD_LIMIT", 8)
    (tmp_path / "c.csv").write_text("text,label\nshort,a\na longer text,b\n")
    with pytest.raises(DatasetError, match=r"client a: cannot read dataset file .*c.csv: line 3: field larger"):
        load_text_dataset(tmp_path / "c.csv", owner="client a")


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    contents = {
        "c.csv": "text,label\nhi,a\n",
        "c.tsv": "text\tlabel\nhi\ta\n",
        "c.jsonl": '{"text": "hi", "label": "a"}\n',
        "c.json": '[{"text": "hi", "label": "a"}]',
    }
    for name, content in contents.items():
        (tmp_path / name).write_text(content, encoding="utf-8-sig")  # as Excel and Notepad save
        data = load_text_dataset(tmp_path / name)
        assert (data.texts, data.labels) == (["hi"], ["a"]), name


def test_blank_csv_lines_are_skipped(tmp_path):
    (tmp_path / "c.csv").write_text("text,label\na,x\n\nb,y\n\n")
    assert load_text_dataset(tmp_path / "c.csv").texts == ["a", "b"]


def test_records_with_non_string_keys_get_a_dataset_error():
    with pytest.raises(DatasetError, match=r"list of records has no text column; its columns are \[0, 'label'\]"):
        load_text_dataset([{0: "a", "label": "x"}])


def test_a_50_mb_row_is_encoded_in_bounded_memory_as_its_prefix(tmp_path, tiny_model_dir):
    """Tokenizers build every token before truncating: the text must be cut first (it took 5 GB here)."""
    resource = pytest.importorskip("resource")
    import sys

    from fedlm.models.loading import load_tokenizer
    from fedlm.tasks.text import encode

    tokenizer = load_tokenizer(str(tiny_model_dir))
    text = ("market shares company bank profit " * 1_500_000)[:50_000_000]
    (tmp_path / "big.csv").write_text(f"text,label\n{text},a\nteam wins,b\n")
    del text
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    data = load_text_dataset(tmp_path / "big.csv")
    encoded = encode(tokenizer, data.texts, [0, 1], max_length=128)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit - peak_before
    assert growth < 2**30, f"peak memory grew by {growth / 2**20:.0f} MiB"
    prefix = tokenizer(data.texts[0][:10_000], truncation=True, max_length=128)["input_ids"]
    assert encoded.input_ids[0] == prefix and len(prefix) == 128
    assert encoded.input_ids[1] == tokenizer("team wins", truncation=True, max_length=128)["input_ids"]
