"""The in-process simulation: one model replica, N clients that are just data, one round loop.

`build_simulation` turns a `RunConfig` into a `FedServer` over data-only clients that share one
model object (each fit loads the global parameters first), so memory grows with the data, not
with the number of clients; `fedlm.runtime.rounds.run_federation` drives the rounds.
"""

from __future__ import annotations

import logging

import torch

from fedlm.client import FedClient, TrainingOptions
from fedlm.config import DistillationConfig, LoraConfig, RunConfig, check_output_dir, cohort_problem
from fedlm.data.report import partition_summary
from fedlm.errors import ConfigError
from fedlm.models import load_tokenizer
from fedlm.privacy.homomorphic import HomomorphicKeys
from fedlm.runtime.assemble import build_algorithm, build_federation, build_model, check_device
from fedlm.runtime.federated_data import build_task, prepare_federated_data, resolve_clients_per_round, target_keys
from fedlm.runtime.rounds import Federation

logger = logging.getLogger("fedlm")


def client_model_names(config: RunConfig, num_clients: int) -> list[str]:
    """Each client's model: distillation's `client_models` in turn, else `model.name`."""
    names = config.algorithm.client_models if isinstance(config.algorithm, DistillationConfig) else None
    return [config.model.name] * num_clients if not names else [names[i % len(names)] for i in range(num_clients)]


def client_lora_ranks(config: RunConfig, num_clients: int) -> list[int | None]:
    """Each client's LoRA rank (None: the config's r): `peft.client_ranks` in turn."""
    ranks = config.peft.client_ranks if isinstance(config.peft, LoraConfig) else None
    if ranks is None:
        return [None] * num_clients
    if len(ranks) > num_clients:
        raise ConfigError(
            f"peft.client_ranks lists {len(ranks)} ranks for {num_clients} clients; list at most one per client"
        )
    return [ranks[index % len(ranks)] for index in range(num_clients)]


def cohort_source(config: RunConfig, num_clients: int) -> str:
    """Where the number of clients per round comes from, for `cohort_problem`'s message."""
    federation = config.federation
    if federation.clients_per_round is not None:
        return "federation.clients_per_round"
    if federation.fraction is not None:
        return f"federation.fraction {federation.fraction} of the {num_clients} clients"
    return f"all {num_clients} clients of data.partition take part"


def build_simulation(config: RunConfig) -> Federation:
    """The config's federation in this process: its data partitioned into data-only clients that
    share one model replica."""
    check_output_dir(config.output_dir)
    check_device(config.training.device)
    if config.training.threads is not None:
        torch.set_num_threads(config.training.threads)
    task = build_task(config)
    federated = prepare_federated_data(config, task)
    num_clients = len(federated.clients)
    clients_per_round = resolve_clients_per_round(config, num_clients)
    problem = cohort_problem(config, clients_per_round or num_clients, cohort_source(config, num_clients))
    if problem:
        raise ConfigError(problem)
    metadata = task.metadata(target_keys(federated, task))
    # clients with the same model (and LoRA rank) share one replica
    kinds = list(zip(client_model_names(config, num_clients), client_lora_ranks(config, num_clients)))
    models = {kind: build_model(config, kind[0], metadata, kind[1]) for kind in dict.fromkeys(kinds)}
    tokenizers = {name: load_tokenizer(name) for name, _ in models}
    options = config.training.model_dump(include=set(TrainingOptions.__dataclass_fields__))
    clients = [
        FedClient(client.train, models[kind], tokenizers[kind[0]], name=client.name, test_dataset=client.test,
                  task=task, seed=config.seed, **options)
        for client, kind in zip(federated.clients, kinds)
    ]  # fmt: skip
    public_context = None
    if config.homomorphic is not None:  # the run plays the clients' key service: the server gets the public part
        if config.homomorphic.public_context is not None:
            raise ConfigError(
                "homomorphic.public_context is for --backend flower; a simulation makes its own keys (remove it)"
            )
        keys = HomomorphicKeys(config.homomorphic.poly_modulus_degree)
        for client in clients:
            client.homomorphic_keys = keys
        public_context = keys.public_context()
    algorithm = build_algorithm(config, task, metadata, federated.public)
    return build_federation(
        config, clients, algorithm, public_context=public_context, validation=federated.validation,
        partition=partition_summary(federated, task.class_labels, config.data.group_column),
    )  # fmt: skip
