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
from fedlm.data import (
    BUNDLED_DATASETS,
    IidPartitioner,
    LabelMap,
    TextDataset,
    holdout_split,
    load_bundled_dataset,
    load_text_dataset,
)
from fedlm.errors import ConfigError
from fedlm.models import load_classifier, load_tokenizer
from fedlm.server import FedServer
from fedlm.tasks.classification import EncodedDataset


@dataclass
class Simulation:
    config: RunConfig
    server: FedServer
    validation: EncodedDataset


def load_run_dataset(config: RunConfig) -> TextDataset:
    data_config = config.data
    if data_config.dataset in BUNDLED_DATASETS:
        data = load_bundled_dataset(data_config.dataset)
    else:
        data = load_text_dataset(
            data_config.dataset, data_config.text_column, data_config.label_column, owner="data.dataset"
        )
    if data_config.max_examples is not None and data_config.max_examples < len(data):
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "subset"))
        data = data.subset(sorted(torch.randperm(len(data), generator=generator)[: data_config.max_examples].tolist()))
    return data


def build_simulation(config: RunConfig) -> Simulation:
    if config.training.threads is not None:
        torch.set_num_threads(config.training.threads)
    data = load_run_dataset(config)
    train_indices, validation_indices = holdout_split(
        len(data), config.data.validation_fraction, derive_seed(config.seed, "validation")
    )
    train = data.subset(train_indices)
    num_clients = config.federation.num_clients
    if len(train) < num_clients:
        raise ConfigError(
            f"federation.num_clients: {num_clients} clients need at least as many training examples, have {len(train)}"
        )
    parts = IidPartitioner(num_clients, seed=derive_seed(config.seed, "partition")).partition(len(train))

    label_map = LabelMap.from_values(data.labels)
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
    width = len(str(num_clients - 1))
    clients = [
        FedClient(train.subset(part), model, tokenizer, name=f"client-{index:0{width}d}", **options)
        for index, part in enumerate(parts)
    ]
    strategy_config = config.strategy.model_dump()
    strategy = STRATEGIES[strategy_config.pop("kind")](**strategy_config)
    server = FedServer(clients, strategy, seed=config.seed, min_clients=config.federation.min_clients)
    validation = server.encode_dataset(data.subset(validation_indices)) if validation_indices else None
    return Simulation(config, server, validation)


def run_simulation(
    simulation: Simulation, on_round_end: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Run the configured rounds; writes config.yaml, metrics.jsonl (round 0 = before training) and model/."""
    config, server = simulation.config, simulation.server
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(config.to_yaml())
    with (output / "metrics.jsonl").open("w") as metrics_file:

        def record_round(record: dict[str, Any]) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if on_round_end is not None:
                on_round_end(record)

        if simulation.validation is not None:
            initial = {f"val_{key}": value for key, value in server.evaluate(simulation.validation).items()}
            record_round({"round": 0, **initial})
        history = server.fit(
            rounds=config.federation.rounds,
            local_epochs=config.training.local_epochs,
            clients_per_round=config.federation.clients_per_round,
            validation=simulation.validation,
            on_round_end=record_round,
        )
    server.save(output / "model")
    return history
