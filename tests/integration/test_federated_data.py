"""From a config to clients: partitions, client test splits, the federated validation set, reports."""

import csv
import json

import pytest

from conftest import make_records
from fedlm.config import parse_config
from fedlm.data.report import partition_summary, write_partition_report
from fedlm.errors import ConfigError, DatasetError
from fedlm.runtime import build_simulation
from fedlm.runtime.federated_data import prepare_federated_data


def write_csv(path, records):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return str(path)


@pytest.fixture
def multilingual_csv(tmp_path):
    records = make_records(300, seed=0)
    for index, record in enumerate(records):
        record["language"] = ["en", "fr", "de"][index % 3]
    return write_csv(tmp_path / "reviews.csv", records)


def config(dataset, partition, **data):
    return parse_config({"data": {"dataset": dataset, "partition": partition, **data}})


def test_natural_partition_names_clients_by_value_and_splits_each(multilingual_csv):
    federated = prepare_federated_data(
        config(multilingual_csv, {"kind": "natural", "column": "language"}, client_test_fraction=0.2)
    )
    assert [client.name for client in federated.clients] == ["de", "en", "fr"]
    for client in federated.clients:
        assert set(client.train.columns["language"]) == {client.name} == set(client.test.columns["language"])
        assert len(client.test) == round(0.2 * (len(client.train) + len(client.test)))
    total = sum(len(c.train) + len(c.test) for c in federated.clients) + len(federated.validation)
    assert total == 300 and len(federated.validation) == 60


def test_dirichlet_partition_from_config_is_skewed_and_seeded(multilingual_csv):
    data = config(multilingual_csv, {"kind": "dirichlet", "alpha": 0.1, "num_clients": 6, "min_size": 3})
    first, second = prepare_federated_data(data), prepare_federated_data(data)
    assert [c.train.texts for c in first.clients] == [c.train.texts for c in second.clients]
    summary = partition_summary(first)
    assert summary["mean_top_label_share"] > 0.6 and summary["client_examples"]["min"] >= 2


def test_predefined_clients_from_a_folder(tmp_path):
    folder = tmp_path / "clients"
    folder.mkdir()
    write_csv(folder / "hospital_a.csv", make_records(30, seed=1))
    (folder / "hospital_b.jsonl").write_text("\n".join(json.dumps(r) for r in make_records(20, seed=2)))
    (folder / "notes.txt").write_text("not a client")
    validation = write_csv(tmp_path / "val.csv", make_records(15, seed=3))
    federated = prepare_federated_data(
        parse_config(
            {
                "data": {
                    "dataset": None,
                    "partition": {"kind": "predefined", "folder": str(folder)},
                    "validation_file": validation,
                }
            }
        )
    )
    assert [c.name for c in federated.clients] == ["hospital_a", "hospital_b"]
    assert [len(c.train) + len(c.test) for c in federated.clients] == [30, 20]
    assert len(federated.validation) == 15


def test_natural_split_on_a_missing_column_lists_the_columns(multilingual_csv):
    with pytest.raises(
        DatasetError,
        match=r"data.partition.column: .* has no column 'hospital'; its columns are \['label', 'language', 'text'\]",
    ):
        prepare_federated_data(config(multilingual_csv, {"kind": "natural", "column": "hospital"}))


def test_validation_labels_the_clients_never_have(tmp_path):
    train = write_csv(tmp_path / "train.csv", [r for r in make_records(100, seed=1) if r["label"] != "tech"])
    validation = write_csv(tmp_path / "val.csv", make_records(30, seed=2))
    with pytest.raises(DatasetError, match=r"validation set has labels \['tech'\] that no client's training data has"):
        prepare_federated_data(config(train, {"kind": "iid", "num_clients": 2}, validation_file=validation))


def test_a_client_left_without_training_examples(tmp_path):
    records = make_records(40, seed=1)
    for index, record in enumerate(records):
        record["site"] = "tiny" if index < 2 else "big"
    data = write_csv(tmp_path / "d.csv", records)
    with pytest.raises(DatasetError, match="client tiny is left with zero training examples.*client_test_fraction"):
        prepare_federated_data(
            config(data, {"kind": "natural", "column": "site"}, validation_fraction=0.0, client_test_fraction=0.9)
        )


def test_unknown_dataset_name_lists_the_registered_ones():
    with pytest.raises(DatasetError, match=r"unknown dataset name 'imdbb'; bundled datasets are \[.*'bbc-news'"):
        prepare_federated_data(config("imdbb", {"kind": "iid"}))


def test_alpha_and_too_many_clients_fail_cleanly(multilingual_csv):
    with pytest.raises(ConfigError, match="cannot give 500 clients"):
        prepare_federated_data(config(multilingual_csv, {"kind": "dirichlet", "alpha": 1, "num_clients": 500}))


def test_clients_per_round_beyond_the_clients(multilingual_csv, tiny_model_dir):
    data = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"dataset": multilingual_csv, "partition": {"kind": "natural", "column": "language"}},
        "federation": {"clients_per_round": 4},
    }
    with pytest.raises(ConfigError, match=r"federation.clients_per_round \(4\) exceeds the number of clients \(3\)"):
        build_simulation(parse_config(data))


def test_partition_report_files(multilingual_csv, tmp_path):
    summary = partition_summary(
        prepare_federated_data(config(multilingual_csv, {"kind": "shards", "num_clients": 3, "labels_per_client": 1}))
    )
    assert all(client["top_label_share"] == 1.0 for client in summary["clients"])
    assert sorted(client["top_label"] for client in summary["clients"]) == ["business", "sport", "tech"]
    write_partition_report(summary, tmp_path / "report")
    assert json.loads((tmp_path / "report" / "partition.json").read_text()) == json.loads(json.dumps(summary))
    assert (tmp_path / "report" / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
