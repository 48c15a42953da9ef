"""`fedlm run`'s simulation: data-only clients on one model replica, determinism, the run folder."""

import json

import pytest
import torch

from fedlm.config import parse_config
from fedlm.errors import ConfigError
from fedlm.runtime import build_simulation, run_federation


@pytest.fixture
def config_data(config_data_factory):
    return config_data_factory(num_clients=4, rounds=3, federation={"clients_per_round": 3})


def test_clients_are_data_sharing_one_model(config_data):
    simulation = build_simulation(parse_config(config_data))
    clients = simulation.server.clients
    assert len(clients) == 4 and all(client.model is clients[0].model for client in clients)
    assert len(simulation.validation) == 100
    assert sum(len(client.data) for client in clients) + sum(len(client.test_data) for client in clients) == 300
    assert all(len(client.test_data) == round(0.1 * (len(client.data) + len(client.test_data))) for client in clients)
    assert all(client._instructions.parameters is simulation.server.global_params for client in clients)


def test_same_config_gives_bit_identical_models_and_another_seed_does_not(config_data):
    def final_params(data):
        simulation = build_simulation(parse_config(data))
        simulation.server.fit(rounds=2, local_epochs=1, clients_per_round=3)
        return simulation.server.global_params

    first = final_params(config_data)
    assert torch.equal(first, final_params(config_data))
    assert not torch.equal(first, final_params({**config_data, "seed": 4}))


def test_run_writes_metrics_config_and_a_reloadable_model(config_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    config = parse_config(config_data)
    history = run_federation(build_simulation(config))
    output = tmp_path / "run"
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    assert lines[1:] == json.loads(json.dumps(history))
    assert lines[-1]["val_accuracy"] > lines[0]["val_accuracy"] + 0.3
    assert all(line["clients"] == 3 and line["bytes_up"] > 0 and line["bytes_down"] > 0 for line in lines[1:])
    summary = json.loads((output / "summary.json").read_text())  # cumulative bytes per client
    assert summary["rounds"] == 3 and summary["final"]["val_accuracy"] == lines[-1]["val_accuracy"]
    assert lines[0]["bytes_down"] > 0  # round 0 evaluates on the clients' test splits
    for name, moved in summary["clients"].items():
        assert moved["up"] == sum(line["client_bytes"].get(name, {}).get("up", 0) for line in lines) > 0
        assert moved["down"] == sum(line["client_bytes"].get(name, {}).get("down", 0) for line in lines)
    assert summary["bytes_up"] == sum(moved["up"] for moved in summary["clients"].values())
    assert parse_config(__import__("yaml").safe_load((output / "config.yaml").read_text())) == config
    model = AutoModelForSequenceClassification.from_pretrained(output / "model")
    assert model.config.id2label == {0: "business", 1: "sport", 2: "tech"}


def test_more_clients_than_examples_is_a_config_error(config_data):
    config_data["data"]["max_examples"] = 10
    config_data["data"]["partition"] = {"kind": "iid", "num_clients": 9}
    with pytest.raises(ConfigError, match="cannot give 9 clients at least 1 example"):
        build_simulation(parse_config(config_data))
