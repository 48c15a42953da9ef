"""Quantity skew: clients hold very different amounts of data, labels IID. Sizes follow
Dirichlet(alpha) shares (as in Li et al. 2022, "Federated Learning on Non-IID Data Silos",
arXiv:2102.02079) or a power law (LEAF, Caldas et al. 2018, arXiv:1812.01097)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np

from fedlm.data.partition.base import Partition, Partitioner, check_num_clients, sizes_from_shares, split_by_sizes
from fedlm.errors import ConfigError


class QuantityPartitioner(Partitioner):
    """Client sizes are `min_size` plus a share of the rest: Dirichlet(alpha) shares, or power-law
    shares (rank r gets a share proportional to r^-exponent, ranks shuffled with the seed, so the
    largest client holds about num_clients^exponent times the smallest's share)."""

    def __init__(
        self,
        num_clients: int,
        distribution: Literal["dirichlet", "power_law"] = "dirichlet",
        alpha: float = 1.0,
        exponent: float = 1.0,
        min_size: int = 1,
        seed: int = 0,
    ) -> None:
        if distribution not in ("dirichlet", "power_law"):
            raise ConfigError(f"quantity distribution must be 'dirichlet' or 'power_law', got {distribution!r}")
        if distribution == "dirichlet" and not alpha > 0:
            raise ConfigError(f"quantity alpha must be > 0, got {alpha}")
        if distribution == "power_law" and not exponent >= 0:
            raise ConfigError(f"quantity exponent must be >= 0, got {exponent}")
        self.num_clients = num_clients
        self.distribution = distribution
        self.alpha = alpha
        self.exponent = exponent
        self.min_size = min_size
        self.seed = seed

    def shares(self, rng: np.random.Generator) -> np.ndarray:
        if self.distribution == "dirichlet":
            return rng.dirichlet(np.full(self.num_clients, self.alpha))
        return rng.permutation(np.arange(1, self.num_clients + 1, dtype=np.float64) ** -self.exponent)

    def partition(self, targets: Sequence[Hashable]) -> Partition:
        check_num_clients(self.num_clients, len(targets), self.min_size)
        rng = np.random.default_rng(self.seed)
        extra = sizes_from_shares(len(targets) - self.num_clients * self.min_size, self.shares(rng))
        return split_by_sizes(rng.permutation(len(targets)), self.min_size + extra)
