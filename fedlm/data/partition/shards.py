"""Pathological label skew: each client holds exactly k labels (McMahan et al. 2017,
arXiv:1602.05629, gave each client shards of 2 labels)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from fedlm.data.partition.base import Partition, Partitioner, check_num_clients, encode_targets
from fedlm.errors import ConfigError


class ShardsPartitioner(Partitioner):
    """Client i holds labels perm[(i*k + j) mod L] for j < k, a seeded permutation `perm` of the L
    labels; each label's examples are split evenly among the clients holding it. Needs
    num_clients * k >= L so that every example has a client."""

    def __init__(self, num_clients: int, labels_per_client: int, seed: int = 0) -> None:
        if labels_per_client < 1:
            raise ConfigError(f"labels_per_client must be >= 1, got {labels_per_client}")
        self.num_clients = num_clients
        self.labels_per_client = labels_per_client
        self.seed = seed

    def partition(self, targets: Sequence[Hashable]) -> Partition:
        check_num_clients(self.num_clients, len(targets))
        codes, num_classes = encode_targets(targets)
        k = self.labels_per_client
        if k > num_classes:
            raise ConfigError(f"labels_per_client is {k} but the data has only {num_classes} labels")
        if self.num_clients * k < num_classes:
            raise ConfigError(
                f"{self.num_clients} clients x {k} labels cannot cover all {num_classes} labels; "
                f"use at least {-(-num_classes // k)} clients or more labels_per_client"
            )
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(num_classes)
        holders: list[list[int]] = [[] for _ in range(num_classes)]
        for client in range(self.num_clients):
            for j in range(k):
                holders[order[(client * k + j) % num_classes]].append(client)
        parts: list[list[int]] = [[] for _ in range(self.num_clients)]
        for label, clients in enumerate(holders):
            members = rng.permutation(np.flatnonzero(codes == label))
            for client, chunk in zip(clients, np.array_split(members, len(clients))):
                parts[client].extend(chunk.tolist())
        empty = [client for client, part in enumerate(parts) if not part]
        if empty:
            raise ConfigError(
                f"shards left clients {empty[:10]} without examples: some labels have fewer examples than clients holding them"
            )
        return [sorted(part) for part in parts]
