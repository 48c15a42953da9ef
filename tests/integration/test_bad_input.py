"""Bad input raises a FedlmError naming what is wrong; failing clients are dropped, not fatal."""

import pytest
import torch

from conftest import build_tiny_model_folder, make_records
from fedlm import ConfigError, DatasetError, FedClient, FedlmError, FedServer, ModelError
from fedlm.protocol import FitRes
from fedlm.tasks.classification import load_classifier


def test_missing_dataset_file_names_the_client(tmp_path, load_tiny):
    with pytest.raises(DatasetError, match=r"client hospital: dataset file .*hospital.csv does not exist"):
        FedClient(dataset=str(tmp_path / "hospital.csv"), model=load_tiny())


def test_dataset_without_label_column_lists_its_columns(load_tiny):
    with pytest.raises(
        DatasetError, match=r"client x: list of records has no label column; its columns are \['stars', 'text'\]"
    ):
        FedClient([{"text": "a", "stars": 3}], load_tiny(), name="x")


def test_empty_client_is_rejected(tmp_path, load_tiny):
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(DatasetError, match="client empty: .*empty.csv holds no rows"):
        FedClient(str(tmp_path / "empty.csv"), load_tiny())


def test_labels_outside_num_labels_name_the_client(load_tiny):
    records = [{"text": "market", "label": 0}, {"text": "goal", "label": 5}]
    with pytest.raises(DatasetError, match=r"client five: labels \['5'\] fall outside the model's 3 classes"):
        FedServer([FedClient(records, load_tiny(3), name="five")])


def test_more_label_names_than_model_classes(load_tiny):
    records = [{"text": "w", "label": name} for name in ("a", "b", "c", "d")]
    with pytest.raises(
        DatasetError, match=r"client four: labels \['d'\] fall outside the model's 3 classes.*num_labels=4"
    ):
        FedServer([FedClient(records, load_tiny(3), name="four")])


def test_models_with_different_federated_parameters_are_rejected(tmp_path, load_tiny):
    wide = load_classifier(str(build_tiny_model_folder(tmp_path / "wide", hidden_size=48)), 3, seed=0)
    clients = [FedClient(make_records(5, 1), load_tiny(), name="a"), FedClient(make_records(5, 2), wide, name="b")]
    with pytest.raises(
        ModelError,
        match=r"client b: its model's federated parameters differ from client a's: parameter 'bert.embeddings.word_embeddings.weight' has shape",
    ):
        FedServer(clients)


def test_unknown_model_and_dataset_names():
    from fedlm.data import load_bundled_dataset

    with pytest.raises(ModelError, match=r"unknown model 'gpt-17'.*\['minilm', 'smollm2-135m'\]"):
        load_classifier("gpt-17", 2, seed=0)
    with pytest.raises(DatasetError, match=r"unknown dataset name 'imdbb'.*'bbc-news'"):
        load_bundled_dataset("imdbb")


def test_a_model_without_a_tokenizer_source_asks_for_one():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    )
    with pytest.raises(ModelError, match="client q: the model has no name_or_path .* pass tokenizer="):
        FedClient(make_records(3, 0), model, name="q")


def test_bad_training_options_and_names(load_tiny):
    with pytest.raises(ConfigError, match=r"unknown options \['lr'\]"):
        FedClient(make_records(3, 0), load_tiny(), lr=0.1)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        FedClient(make_records(3, 0), load_tiny(), batch_size=0)
    model = load_tiny()
    with pytest.raises(ConfigError, match=r"\['same'\] appear more than once"):
        FedServer(
            [FedClient(make_records(3, 0), model, name="same"), FedClient(make_records(3, 1), model, name="same")]
        )


def test_aggregate_without_training_is_an_error(load_tiny):
    server = FedServer([FedClient(make_records(3, 0), load_tiny(), name="a")])
    with pytest.raises(FedlmError, match="call client.local_train"):
        server.aggregate_parameters()


class Crashing(FedClient):
    def fit(self, ins):
        raise RuntimeError("disk full")


class SendsNaN(FedClient):
    def fit(self, ins):
        result = super().fit(ins)
        return FitRes(torch.full_like(result.delta, float("nan")), result.num_examples, result.metrics)


class SendsWrongShape(FedClient):
    def fit(self, ins):
        return FitRes(torch.zeros(3), 10, {})


def test_failing_and_malformed_clients_are_dropped_and_the_round_goes_on(load_tiny, caplog):
    model = load_tiny()
    clients = [
        FedClient(make_records(40, 1), model, name="good"),
        Crashing(make_records(40, 2), model, name="crash"),
        SendsNaN(make_records(40, 3), model, name="nan"),
        SendsWrongShape(make_records(40, 4), model, name="shape"),
    ]
    server = FedServer(clients)
    before = server.global_params.clone()
    record = server.run_round()
    reasons = {item["client"]: item["reason"] for item in record["dropped"]}
    assert reasons["crash"] == "RuntimeError: disk full"
    assert "NaN" in reasons["nan"]
    assert "shape [3]" in reasons["shape"]
    assert record["clients"] == 1 and record["train_examples"] == 40
    assert not torch.equal(server.global_params, before) and torch.isfinite(server.global_params).all()
    assert "client crash dropped" in caplog.text


def test_round_is_skipped_when_fewer_than_min_clients_remain(load_tiny):
    model = load_tiny()
    clients = [FedClient(make_records(40, 1), model, name="good"), Crashing(make_records(40, 2), model, name="crash")]
    server = FedServer(clients, min_clients=2)
    before = server.global_params.clone()
    record = server.run_round()
    assert record["skipped"] is True and record["round"] == 1
    assert torch.equal(server.global_params, before)
