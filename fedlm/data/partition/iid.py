"""IID partitioning: a uniform random split into clients of (almost) equal size."""

from __future__ import annotations

import torch


class IidPartitioner:
    """Shuffle the example indices with `seed` and deal them into `num_clients` equal parts."""

    def __init__(self, num_clients: int, seed: int = 0) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self.seed = seed

    def partition(self, num_examples: int) -> list[list[int]]:
        if num_examples < self.num_clients:
            raise ValueError(f"cannot give {self.num_clients} clients at least one of {num_examples} examples each")
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return [sorted(order[client :: self.num_clients]) for client in range(self.num_clients)]
