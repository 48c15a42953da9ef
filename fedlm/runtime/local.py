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

from fedlm.checkpoint import load_checkpoint, save_checkpoint
from fedlm.client import FedClient, TrainingOptions
from fedlm.config import RunConfig, StrategyConfig
from fedlm.core.robust import ROBUST_AGGREGATES
from fedlm.core.seeding import derive_seed
from fedlm.core.strategies import STRATEGIES, Strategy
from fedlm.data import LabelMap
from fedlm.data.report import partition_summary, write_partition_report
from fedlm.models import load_classifier, load_tokenizer
from fedlm.runtime.federated_data import prepare_federated_data, resolve_clients_per_round
from fedlm.server import FedServer
from fedlm.tasks.classification import EncodedDataset


@dataclass
class Simulation:
    config: RunConfig
    server: FedServer
    validation: EncodedDataset | None
    partition: dict[str, Any]
    clients_per_round: int | None


def build_strategy(config: StrategyConfig, num_clients: int) -> Strategy:
    options = config.model_dump(exclude={"kind", "robust"})
    if config.robust is not None:
        robust_options = config.robust.model_dump(exclude={"kind"})
        options["robust"] = ROBUST_AGGREGATES[config.robust.kind](**robust_options)
    if config.kind == "scaffold":
        options["num_clients"] = num_clients
    return STRATEGIES[config.kind](**options)


def build_simulation(config: RunConfig) -> Simulation:
    if config.training.threads is not None:
        torch.set_num_threads(config.training.threads)
    federated = prepare_federated_data(config)
    clients_per_round = resolve_clients_per_round(config, len(federated.clients))
    label_map = LabelMap.from_values(federated.label_values())
    model = load_classifier(config.model.name, num_labels=label_map.num_labels, seed=derive_seed(config.seed, "init"))
    tokenizer = load_tokenizer(config.model.name)
    options = config.training.model_dump(include=set(TrainingOptions.__dataclass_fields__))
    clients = [
        FedClient(
            client.train, model, tokenizer, name=client.name, test_dataset=client.test, seed=config.seed, **options
        )
        for client in federated.clients
    ]
    server = FedServer(
        clients,
        build_strategy(config.strategy, len(clients)),
        seed=config.seed,
        min_clients=config.federation.min_clients,
        round_timeout=config.federation.round_timeout,
    )
    validation = None if federated.validation is None else server.encode_dataset(federated.validation)
    return Simulation(config, server, validation, partition_summary(federated), clients_per_round)


def run_simulation(
    simulation: Simulation, on_round_end: Callable[[dict[str, Any]], None] | None = None, resume: bool = False
) -> list[dict[str, Any]]:
    """Run the configured rounds, checkpointing after round 0 and every `checkpoint_every` rounds.

    Writes config.yaml, the partition report, metrics.jsonl (round 0 = before training),
    checkpoint/ and model/ into the output folder. With `resume`, continues from the folder's
    checkpoint (an error if there is none, it is corrupt, or the config differs). Returns the
    records of rounds 1 and up.
    """
    config, server = simulation.config, simulation.server
    output = Path(config.output_dir)
    checkpoint = output / "checkpoint"
    config_data = config.model_dump(mode="json")
    records = load_checkpoint(server, checkpoint, config_data) if resume else []
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(config.to_yaml())
    write_partition_report(simulation.partition, output)
    federation = config.federation
    with (output / "metrics.jsonl").open("w") as metrics_file:
        metrics_file.writelines(json.dumps(record) + "\n" for record in records)

        def record_round(record: dict[str, Any]) -> None:
            records.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            due = federation.checkpoint_every and record["round"] % federation.checkpoint_every == 0
            if record["round"] == 0 or due or record["round"] == federation.rounds:
                save_checkpoint(server, checkpoint, records, config_data)
            if on_round_end is not None:
                on_round_end(record)

        if not records:
            record_round(
                {"round": 0, **server.evaluate_global_model(simulation.validation, federation.clients_per_evaluation)}
            )
        if federation.rounds > server.round:
            server.fit(
                rounds=federation.rounds - server.round,
                local_epochs=config.training.local_epochs,
                clients_per_round=simulation.clients_per_round,
                validation=simulation.validation,
                clients_per_evaluation=federation.clients_per_evaluation,
                on_round_end=record_round,
            )
    server.save(output / "model")
    return [record for record in records if record["round"] > 0]
