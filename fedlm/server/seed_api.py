"""The seed API: the federated loop driven by hand, in the shape the literature shows it.

    for c in server.clients: c.local_train(epochs=1)
    server.aggregate_parameters(); server.broadcast_model()
    fed_model = server.get_model()

`FedServer` inherits these methods; they work over in-process `FedClient`s and weight averaging.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from fedlm.client import FedClient
from fedlm.core.update import train_summary
from fedlm.errors import FedlmError
from fedlm.server.evaluation import evaluate_dataset


class SeedApi:
    """`broadcast_model`, `aggregate_parameters`, `evaluate`, `get_model` and `save` of a `FedServer`."""

    def broadcast_model(self) -> None:
        """Send the global parameters and the strategy's round instructions to every client
        (parameters are loaded once per distinct model object)."""
        clients = self._local_clients("broadcast_model")
        messages = self._fit_messages([client.name for client in clients], self.round + 1, 1, compress=False)
        loaded: set[int] = set()
        for client in clients:
            client.receive(messages[client.name], load_parameters=id(client.model) not in loaded)
            loaded.add(id(client.model))

    def aggregate_parameters(self) -> dict[str, Any]:
        """FedAvg (or the configured strategy) over the clients that trained since the last call."""
        round_number = self.round + 1
        replies = {client.name: client.take_update() for client in self._local_clients("aggregate_parameters")}
        updates, dropped = self._gated(
            {name: reply for name, reply in replies.items() if reply is not None}, round_number
        )
        if not updates:
            raise FedlmError("no client has a new update to aggregate; call client.local_train() first")
        summary = self.algorithm.aggregate(self.global_model, self.strategy, updates, self.seed, round_number)
        self.round = round_number
        self.history.append(
            {"round": self.round, "clients": len(updates), "dropped": dropped, **train_summary(updates), **summary}
        )
        return self.history[-1]

    def evaluate(self, dataset: Any, text_column: str | None = None, label_column: str | None = None) -> dict:
        """The task's loss and metrics (classification: accuracy, macro-F1) of the global model on a
        (federated validation) dataset."""
        return evaluate_dataset(self.global_model, self.encode_dataset(dataset, text_column, label_column))

    def get_model(self) -> torch.nn.Module:
        """A transformers model holding the global parameters (a copy: later rounds do not change it)."""
        return copy.deepcopy(self.global_model.model())

    def save(self, path: str | Path, merge_lora: bool = True) -> Path:
        """Write the global model with `save_pretrained` (`GlobalModel.save`)."""
        return self.global_model.save(path, self.round, merge_lora)

    def _local_clients(self, method: str) -> list[FedClient]:
        if self.algorithm.replaces_weights:
            raise FedlmError(f"{method} averages weights; a server running FederatedDistillation trains with fit()")
        if not all(isinstance(client, FedClient) for client in self.clients):
            raise FedlmError(f"{method} needs FedClient objects; this server's clients are remote, use fit()")
        return self.clients
