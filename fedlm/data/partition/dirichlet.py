"""Dirichlet label skew: Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", arXiv:1909.06335; used for text by FedNLP
(Lin et al. 2022, arXiv:2104.08815) with alpha in {1, 5, 10} and 100 clients."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from fedlm.data.partition.base import Partition, Partitioner, check_num_clients, encode_targets, groups_from_assignment
from fedlm.errors import ConfigError


class DirichletPartitioner(Partitioner):
    """For each label, client shares are drawn from Dirichlet(alpha, ..., alpha) and the label's
    examples are dealt out in those shares. Small alpha (0.1) gives clients dominated by one
    label; large alpha (1000) approaches IID.

    Clients left with fewer than `min_size` examples are then topped up with random examples
    taken from clients that have more than `min_size`, so the guarantee holds without an
    unbounded resampling loop (which never ends for thousands of clients and small alpha).
    """

    def __init__(self, num_clients: int, alpha: float, min_size: int = 1, seed: int = 0) -> None:
        if not alpha > 0:
            raise ConfigError(f"dirichlet alpha must be > 0, got {alpha} (0.1 is strongly skewed, 1000 near IID)")
        self.num_clients = num_clients
        self.alpha = alpha
        self.min_size = min_size
        self.seed = seed

    def partition(self, targets: Sequence[Hashable]) -> Partition:
        check_num_clients(self.num_clients, len(targets), self.min_size)
        rng = np.random.default_rng(self.seed)
        codes, num_classes = encode_targets(targets)
        client_of = np.empty(len(codes), dtype=np.int64)
        by_class = np.argsort(codes, kind="stable")
        class_bounds = np.cumsum(np.bincount(codes, minlength=num_classes))
        for start, end in zip(np.concatenate([[0], class_bounds[:-1]]), class_bounds):
            members = rng.permutation(by_class[start:end])
            shares = rng.dirichlet(np.full(self.num_clients, self.alpha))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            counts = np.diff(np.concatenate([[0], cuts, [len(members)]]))
            client_of[members] = np.repeat(np.arange(self.num_clients), counts)
        self._top_up(client_of, rng)
        return groups_from_assignment(client_of, self.num_clients)

    def _top_up(self, client_of: np.ndarray, rng: np.random.Generator) -> None:
        sizes = np.bincount(client_of, minlength=self.num_clients)
        needy = [
            client for client in np.flatnonzero(sizes < self.min_size) for _ in range(self.min_size - sizes[client])
        ]
        if not needy:
            return
        for example in rng.permutation(len(client_of)):
            donor = client_of[example]
            if sizes[donor] > self.min_size:
                receiver = needy.pop()
                client_of[example] = receiver
                sizes[donor] -= 1
                sizes[receiver] += 1
                if not needy:
                    return
