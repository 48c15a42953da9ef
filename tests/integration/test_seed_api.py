"""The seed API, in the shape the literature shows, on a tiny random-init BERT."""

import csv
import json

import pytest
import torch

from conftest import make_records
from fedlm import FedClient, FedServer
from fedlm.core.strategies import Scaffold
from fedlm.models import get_federated_vector

FAST = {"learning_rate": 3e-3, "max_length": 32, "batch_size": 16}


def write_clients(tmp_path):
    csv_path, jsonl_path = tmp_path / "client1.csv", tmp_path / "client2.jsonl"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_records(240, seed=1))
    jsonl_path.write_text("\n".join(json.dumps(r) for r in make_records(160, seed=2)))
    return csv_path, jsonl_path


def test_seed_example_learns_far_above_chance(tmp_path, load_tiny):
    csv_path, jsonl_path = write_clients(tmp_path)
    client1 = FedClient(dataset=str(csv_path), model=load_tiny(seed=1), **FAST)
    client2 = FedClient(dataset=str(jsonl_path), model=load_tiny(seed=2), **FAST)
    clients = [client1, client2]
    server = FedServer(clients)
    validation = make_records(300, seed=99)
    before = server.evaluate(validation)["accuracy"]
    for _ in range(4):
        for client in clients:
            metrics = client.local_train(epochs=2)
            assert set(metrics) >= {"loss", "num_examples", "seconds"}
        server.aggregate_parameters()
        server.broadcast_model()
    fed_model = server.get_model()
    after = server.evaluate(validation)["accuracy"]
    assert after > 0.9 and after > before + 0.3, (before, after)
    assert type(fed_model).__name__ == "BertForSequenceClassification"
    assert fed_model.config.id2label == {0: "business", 1: "sport", 2: "tech"}
    assert [c.name for c in server.clients] == ["client1", "client2"]


def test_aggregate_is_the_example_weighted_mean_of_the_trained_clients(load_tiny):
    clients = [
        FedClient(make_records(30, seed=1), load_tiny(seed=1), name="small", **FAST),
        FedClient(make_records(90, seed=2), load_tiny(seed=2), name="large", **FAST),
        FedClient(make_records(50, seed=3), load_tiny(seed=3), name="idle", **FAST),
    ]
    server = FedServer(clients)
    start = server.global_params.clone()
    clients[0].local_train()
    clients[1].local_train()
    trained = [get_federated_vector(c.model) for c in clients[:2]]
    assert not torch.equal(trained[0], start)
    record = server.aggregate_parameters()
    expected = (30 * trained[0] + 90 * trained[1]) / 120  # the idle client has no update
    assert torch.allclose(server.global_params, expected, atol=1e-6)
    assert record["clients"] == 2 and record["train_examples"] == 120
    server.broadcast_model()
    for client in clients:
        assert torch.equal(get_federated_vector(client.model), server.global_params)


def test_a_server_continues_exactly_from_another_servers_state_dict(load_tiny):
    def scaffold_server():
        options = {**FAST, "optimizer": "sgd", "learning_rate": 0.05}
        clients = [FedClient(make_records(40, seed=s), load_tiny(seed=s), name=f"c{s}", **options) for s in (1, 2)]
        return FedServer(clients, Scaffold(num_clients=2), seed=3)

    first, second = scaffold_server(), scaffold_server()
    first.fit(rounds=1, clients_per_evaluation=0)
    state = first.state_dict()
    assert set(state["clients"]) == {"c1/control_variate", "c2/control_variate"}
    assert set(state["strategy"]) == {"server_control"} and state["round"] == 1
    second.load_state_dict(state)
    first.fit(rounds=1, clients_per_evaluation=0)  # must not move the state second took
    second.fit(rounds=1, clients_per_evaluation=0)
    assert second.round == 2 and [record["round"] for record in second.history] == [1, 2]
    assert torch.equal(first.global_params, second.global_params)
    assert not torch.equal(state["global"]["parameters"], second.global_params)

    with pytest.raises(ValueError, match="3 parameters, the model has"):
        second.load_state_dict({**state, "global": {"parameters": torch.zeros(3)}})
    with pytest.raises(ValueError, match="a client has no state \\['momentum'\\]"):
        second.load_state_dict({**state, "clients": {"c1/momentum": torch.zeros(3)}})


def test_server_starts_every_client_from_the_first_clients_model(load_tiny):
    clients = [FedClient(make_records(20, seed=s), load_tiny(seed=s), name=f"c{s}") for s in range(3)]
    assert not torch.equal(get_federated_vector(clients[0].model), get_federated_vector(clients[1].model))
    server = FedServer(clients)
    for client in clients:
        assert torch.equal(get_federated_vector(client.model), server.global_params)


def test_string_labels_are_mapped_consistently_across_clients(load_tiny):
    only_tech = [r for r in make_records(60, seed=1) if r["label"] == "tech"]
    no_tech = [r for r in make_records(60, seed=2) if r["label"] != "tech"]
    clients = [FedClient(only_tech, load_tiny(), name="a"), FedClient(no_tech, load_tiny(), name="b")]
    server = FedServer(clients)
    assert server.global_model.metadata.label2id == {"business": 0, "sport": 1, "tech": 2}
    assert set(clients[0].encoded().labels) == {2}
    assert set(clients[1].encoded().labels) == {0, 1}


def test_fit_returns_history_and_evaluates_each_round(load_tiny):
    clients = [FedClient(make_records(150, seed=s), load_tiny(), name=f"c{s}", **FAST) for s in range(3)]
    server = FedServer(clients)
    history = server.fit(rounds=3, local_epochs=2, validation=make_records(150, seed=50))
    assert [record["round"] for record in history] == [1, 2, 3]
    assert history[-1]["val_accuracy"] > 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert set(history[0]) >= {"val_loss", "val_macro_f1", "bytes_up", "bytes_down", "seconds", "dropped"}
    assert server.history[-3:] == history


def test_client_sampling_is_seeded_by_round(load_tiny):
    model = load_tiny()
    clients = [FedClient(make_records(5, seed=s), model, name=f"c{s}") for s in range(10)]
    server = FedServer(clients, seed=4)
    picks = [[c.name for c in server.sample_clients(r, 3)] for r in (1, 2)]
    assert all(len(pick) == 3 for pick in picks) and picks[0] != picks[1]
    assert picks[0] == [c.name for c in FedServer(clients, seed=4).sample_clients(1, 3)]
    assert picks[0] != [c.name for c in FedServer(clients, seed=5).sample_clients(1, 3)]


def test_bytes_are_counted_on_the_serialized_payloads(load_tiny):
    from fedlm.protocol import FitIns

    model = load_tiny()
    clients = [FedClient(make_records(20, seed=s), model, name=f"c{s}") for s in range(3)]
    server = FedServer(clients)
    expected_down = len(FitIns(server.global_params, {"round": 1, "epochs": 1, "seed": 0}).to_bytes())
    record = server.run_round()
    assert record["bytes_down"] == 3 * expected_down
    assert 3 * 4 * server.global_model.spec.numel < record["bytes_up"] < 3 * (4 * server.global_model.spec.numel + 1000)


def test_saved_model_reloads_and_predicts_the_same(tmp_path, load_tiny):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clients = [FedClient(make_records(80, seed=s), load_tiny(), name=f"c{s}", **FAST) for s in range(2)]
    server = FedServer(clients)
    server.fit(rounds=1)
    server.save(tmp_path / "model")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    model = server.get_model().eval()
    batch = tokenizer([r["text"] for r in make_records(20, seed=7)], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    assert reloaded.config.label2id == {"business": 0, "sport": 1, "tech": 2}
    assert json.loads((tmp_path / "model" / "fedlm.json").read_text())["round"] == 1


def test_label_names_already_in_the_model_config_are_kept(load_tiny):
    model = load_tiny()
    model.config.label2id = {"tech": 0, "sport": 1, "business": 2}
    model.config.id2label = {0: "tech", 1: "sport", 2: "business"}
    client = FedClient(make_records(30, seed=1), model, name="a")
    server = FedServer([client])
    assert server.global_model.metadata.label2id == {"tech": 0, "sport": 1, "business": 2}
    assert client.encoded().labels == [{"tech": 0, "sport": 1, "business": 2}[r] for r in client.data.labels]


def test_clients_are_evaluated_on_their_own_test_splits(load_tiny):
    from fedlm.core.client_metrics import metric_distribution

    model = load_tiny()
    clients = [
        FedClient(
            make_records(60, seed=s), model, name=f"c{s}", test_dataset=make_records(5 + 5 * s, seed=100 + s), **FAST
        )
        for s in range(4)
    ]
    clients.append(FedClient(make_records(60, seed=9), model, name="no-test", **FAST))
    server = FedServer(clients)
    record = server.run_round(local_epochs=2)
    per_client = {item["client"]: item for item in record["client_test"]}
    assert sorted(per_client) == ["c0", "c1", "c2", "c3"] and record["clients_evaluated"] == 4
    assert [per_client[f"c{s}"]["num_examples"] for s in range(4)] == [5, 10, 15, 20]
    for name, client in per_client.items():  # each client's number is the global model on its own test split
        expected = server.evaluate(clients[int(name[1])].test_data)
        assert client["accuracy"] == pytest.approx(expected["accuracy"])
    accuracies = [per_client[f"c{s}"]["accuracy"] for s in range(4)]
    expected = metric_distribution(accuracies, [5, 10, 15, 20])
    assert record["client_accuracy_worst"] == min(accuracies) == expected["worst"]
    assert record["client_accuracy_weighted_mean"] == pytest.approx(
        sum(a * n for a, n in zip(accuracies, [5, 10, 15, 20])) / 50
    )
    assert server.run_round(clients_per_evaluation=0).get("client_test") is None
    sampled = server.run_round(clients_per_evaluation=2)
    assert sampled["clients_evaluated"] <= 2


def test_clients_training_with_dp_sgd_learn_and_report_their_epsilon(tmp_path, load_tiny):
    from fedlm import SampleLevelDP
    from fedlm.privacy.accounting import compute_epsilon

    csv_path, jsonl_path = write_clients(tmp_path)
    # negligible noise: the Poisson-sampled, per-example-clipped training itself must still learn
    # (real noise on a random-init model this small drowns the signal: DP fine-tuning needs a
    # pretrained model, an adapter and large batches, see BENCHMARKS.md)
    private = SampleLevelDP(noise_multiplier=1e-6, clip_norm=1.0)
    model = load_tiny()
    clients = [FedClient(dataset=str(path), model=model, dp_sgd=private, **FAST) for path in (csv_path, jsonl_path)]
    server = FedServer(clients)
    for _ in range(3):
        epsilons = [client.local_train(epochs=2)["dp_sgd_epsilon"] for client in clients]
        server.aggregate_parameters()
        server.broadcast_model()
    # 240 and 160 examples at batch 16: q = 16/n, 2 * round(n/16) steps a round, 3 rounds
    expected = [compute_epsilon(1e-6, 16 / n, 3 * 2 * round(n / 16), 1e-5) for n in (240, 160)]
    assert epsilons == pytest.approx(expected, rel=1e-9)
    assert not hasattr(model, "autograd_grad_sample_hooks")  # Opacus's hooks are gone after training
    assert server.evaluate(make_records(300, seed=99))["accuracy"] > 0.6
