"""IID partitioning: a uniform random split into clients of (almost) equal size."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from fedlm.data.partition.base import Partition, Partitioner, check_num_clients, split_by_sizes


class IidPartitioner(Partitioner):
    """Shuffle the examples with `seed` and deal them into `num_clients` parts whose sizes differ by at most one."""

    def __init__(self, num_clients: int, seed: int = 0) -> None:
        self.num_clients = num_clients
        self.seed = seed

    def partition(self, targets: Sequence[Hashable]) -> Partition:
        check_num_clients(self.num_clients, len(targets))
        sizes = np.full(self.num_clients, len(targets) // self.num_clients)
        sizes[: len(targets) % self.num_clients] += 1
        return split_by_sizes(np.random.default_rng(self.seed).permutation(len(targets)), sizes)
