"""Federated tagging on the tiny BERT: `fedlm run`'s simulation with task token_classification,
all weights and LoRA, and the seed API with the task inferred from a token classifier."""

import json

import pytest
from transformers import AutoModelForTokenClassification

from conftest import make_tagged_sentences
from fedlm import FedClient, FedServer
from fedlm.config import parse_config
from fedlm.errors import ConfigError
from fedlm.runtime import build_simulation, run_federation


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    path = tmp_path_factory.mktemp("ner") / "ner.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in make_tagged_sentences(300, seed=0)))
    return path


def simulate(tiny_model_dir, sentences, output_dir, rounds=3, **sections):
    config = {
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"name": str(tiny_model_dir)},
        "task": {"kind": "token_classification"},
        "data": {
            "dataset": str(sentences),
            "validation_fraction": 0.2,
            "client_test_fraction": 0.2,
            "partition": {"kind": "iid", "num_clients": 3},
        },
        "federation": {"rounds": rounds},
        "training": {"learning_rate": 1e-2, "max_length": 32, "batch_size": 8},
        **sections,
    }
    return run_federation(build_simulation(parse_config(config)))


def test_federated_tagging_raises_entity_f1_and_saves_a_tagger(tiny_model_dir, sentences, tmp_path):
    history = simulate(tiny_model_dir, sentences, tmp_path / "run")
    loss, f1 = [record["val_loss"] for record in history], [record["val_f1"] for record in history]
    assert all(later < earlier for earlier, later in zip(loss, loss[1:])), loss
    assert f1[-1] > f1[0] and f1[-1] > 0.6, f1
    last = history[-1]
    assert {"val_f1_PER", "val_f1_LOC", "val_f1_ORG", "val_precision", "val_recall", "val_token_accuracy"} <= set(last)
    assert {item["client"] for item in last["client_test"]} == {"client-0", "client-1", "client-2"}
    assert all(0 <= item["f1"] <= 1 for item in last["client_test"])
    saved = AutoModelForTokenClassification.from_pretrained(tmp_path / "run" / "model")
    assert sorted(saved.config.label2id) == ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]


def test_lora_trains_the_tagger_and_its_head(tiny_model_dir, sentences, tmp_path):
    history = simulate(
        tiny_model_dir, sentences, tmp_path / "run", rounds=2, peft={"method": "lora", "r": 4},
        training={"learning_rate": 3e-2, "max_length": 32, "batch_size": 8},
    )  # fmt: skip
    loss = [record["val_loss"] for record in history]
    assert loss[1] < loss[0], loss
    # the adapters and the classifier head (7 tags x 32 + 7) travel, not the encoder
    assert 4 * (7 * 32 + 7) < history[0]["client_bytes"]["client-0"]["up"] < 4 * 20_000


def test_the_seed_api_infers_the_task_from_a_token_classifier(tiny_model_dir, sentences, tmp_path):
    rows = [json.loads(line) for line in sentences.read_text().splitlines()]
    tags = sorted({tag for row in rows for tag in row["tags"]})
    model = AutoModelForTokenClassification.from_pretrained(
        tiny_model_dir,
        num_labels=len(tags),
        id2label=dict(enumerate(tags)),
        label2id={t: i for i, t in enumerate(tags)},
    )
    clients = [
        FedClient(dataset=rows[index:200:2], model=model, name=f"c{index}", learning_rate=1e-2, max_length=32)
        for index in range(2)
    ]
    server = FedServer(clients)
    before = server.evaluate(rows[200:])["f1"]
    for _ in range(2):
        for client in server.clients:
            client.local_train(epochs=1)
        server.aggregate_parameters()
        server.broadcast_model()
    assert server.evaluate(rows[200:])["f1"] > before


def test_a_dirichlet_split_over_a_column_skews_it_and_the_report_shows_its_shares(tiny_model_dir, tmp_path):
    """Data without class labels split non-IID by a column (here each sentence's source)."""
    rows = make_tagged_sentences(300, seed=1)
    for index, row in enumerate(rows):
        row["source"] = ["news", "forum", "mail"][index % 3]
    path = tmp_path / "sources.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    history = simulate(
        tiny_model_dir, path, tmp_path / "run", rounds=1,
        data={"dataset": str(path), "validation_fraction": 0.2, "client_test_fraction": 0.2,
              "partition": {"kind": "dirichlet", "num_clients": 3, "alpha": 0.1, "column": "source"}},
    )  # fmt: skip
    report = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert report["column"] == {"name": "source", "values": ["forum", "mail", "news"]}
    shares = [max(client["column_counts"].values()) / client["examples"] for client in report["clients"]]
    assert sum(shares) / len(shares) > 0.55, shares  # an IID split gives about 0.36 here
    assert all(sum(client["column_counts"].values()) == client["examples"] for client in report["clients"])
    assert (tmp_path / "run" / "partition.png").exists()
    # the clients' test results by their main source
    main = {c["client"]: max(c["column_counts"], key=c["column_counts"].get) for c in report["clients"]}
    by_source = history[0]["client_test_by_source"]
    tested = [item for item in history[0]["client_test"] if item["num_examples"]]
    assert sum(group["clients"] for group in by_source.values()) == len(tested) >= 2, history[0]["client_test"]
    for source, group in by_source.items():
        members = [item for item in history[0]["client_test"] if main[item["client"]] == source]
        examples = sum(item["num_examples"] for item in members)
        assert group["num_examples"] == examples
        assert group["f1"] == pytest.approx(sum(item["f1"] * item["num_examples"] for item in members) / examples)


def test_a_cluster_partition_embeds_clusters_and_deals_the_clusters_out(tiny_model_dir, sentences, tmp_path):
    """Sentences have no class labels: k-means over the encoder's embeddings makes the groups that
    a Dirichlet split skews."""
    from fedlm.data.report import partition_summary
    from fedlm.runtime.federated_data import prepare_federated_data

    def config(**partition):
        return parse_config({
            "seed": 0, "model": {"name": str(tiny_model_dir)}, "task": {"kind": "token_classification"},
            "data": {"dataset": str(sentences), "validation_fraction": 0.2, "partition": {
                "kind": "clusters", "num_clients": 4, "clusters": 3, "alpha": 0.1, "encoder": str(tiny_model_dir),
                **partition}},
        })  # fmt: skip

    federated = prepare_federated_data(config())
    summary = partition_summary(federated, class_labels=False, column="cluster")
    assert summary["column"] == {"name": "cluster", "values": ["0", "1", "2"]}
    shares = [max(client["column_counts"].values()) / client["examples"] for client in summary["clients"]]
    assert sum(shares) / len(shares) > 0.6, shares
    assert summary["train_examples"] + summary["test_examples"] == 300 - 60  # every example once
    assert set(federated.validation.columns["cluster"]) <= {0, 1, 2}
    assert prepare_federated_data(config()).clients[0].train.texts == federated.clients[0].train.texts  # seeded
    with pytest.raises(ConfigError, match="data.partition.clusters 500 exceeds the 300 examples"):
        prepare_federated_data(config(clusters=500))
