"""The in-process simulation: one model replica, N clients that are just data, one round loop.

`build_simulation` turns a `RunConfig` into a `FedServer` over data-only clients that share one
model object (each fit loads the global parameters first), so memory grows with the data, not
with the number of clients. `run_simulation` drives the rounds and writes the run folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlm.client import FedClient
from fedlm.config import RunConfig
from fedlm.core.seeding import derive_seed
from fedlm.core.strategies import STRATEGIES
from fedlm.data import LabelMap
from fedlm.data.report import partition_summary, write_partition_report
from fedlm.models import load_classifier, load_tokenizer
from fedlm.runtime.federated_data import check_clients_per_round, prepare_federated_data
from fedlm.server import FedServer
from fedlm.tasks.classification import EncodedDataset


@dataclass
class Simulation:
    config: RunConfig
    server: FedServer
    validation: EncodedDataset | None
    partition: dict[str, Any]


def build_simulation(config: RunConfig) -> Simulation:
    if config.training.threads is not None:
        torch.set_num_threads(config.training.threads)
    federated = prepare_federated_data(config)
    check_clients_per_round(config, len(federated.clients))
    label_map = LabelMap.from_values(federated.label_values())
    model = load_classifier(config.model.name, num_labels=label_map.num_labels, seed=derive_seed(config.seed, "init"))
    tokenizer = load_tokenizer(config.model.name)
    training = config.training
    options = {
        "batch_size": training.batch_size,
        "learning_rate": training.learning_rate,
        "max_length": training.max_length,
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "seed": config.seed,
    }
    clients = [
        FedClient(client.train, model, tokenizer, name=client.name, test_dataset=client.test, **options)
        for client in federated.clients
    ]
    strategy_config = config.strategy.model_dump()
    strategy = STRATEGIES[strategy_config.pop("kind")](**strategy_config)
    server = FedServer(clients, strategy, seed=config.seed, min_clients=config.federation.min_clients)
    validation = None if federated.validation is None else server.encode_dataset(federated.validation)
    return Simulation(config, server, validation, partition_summary(federated))


def run_simulation(
    simulation: Simulation, on_round_end: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Run the configured rounds; writes config.yaml, metrics.jsonl (round 0 = before training) and model/."""
    config, server = simulation.config, simulation.server
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(config.to_yaml())
    write_partition_report(simulation.partition, output)
    with (output / "metrics.jsonl").open("w") as metrics_file:

        def record_round(record: dict[str, Any]) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if on_round_end is not None:
                on_round_end(record)

        clients_per_evaluation = config.federation.clients_per_evaluation
        record_round({"round": 0, **server.evaluate_global_model(simulation.validation, clients_per_evaluation)})
        history = server.fit(
            rounds=config.federation.rounds,
            local_epochs=config.training.local_epochs,
            clients_per_round=config.federation.clients_per_round,
            validation=simulation.validation,
            clients_per_evaluation=clients_per_evaluation,
            on_round_end=record_round,
        )
    server.save(output / "model")
    return history
