"""The partitioner interface and the checks every scheme shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence

import numpy as np

from fedlm.errors import ConfigError

Partition = list[list[int]]


class Partitioner(ABC):
    """Splits examples into clients: `partition(targets)` returns one sorted index list per client.

    `targets` has one value per example: the label, or the column a scheme splits on. Schemes
    that ignore the values (IID, quantity skew) only use its length. Every example lands in
    exactly one client, and the same seed gives the same partition.
    """

    @abstractmethod
    def partition(self, targets: Sequence[Hashable]) -> Partition: ...

    def client_names(self, targets: Sequence[Hashable]) -> list[str] | None:
        """Names for the clients, in partition order, where the scheme defines them (natural splits)."""
        return None


def check_num_clients(num_clients: int, num_examples: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if min_size < 1:
        raise ConfigError(f"min_size must be >= 1, got {min_size}")
    if num_clients * min_size > num_examples:
        raise ConfigError(
            f"cannot give {num_clients} clients at least {min_size} example(s) each from {num_examples} examples; "
            f"use at most {num_examples // min_size} clients or a smaller min_size"
        )


def encode_targets(targets: Sequence[Hashable]) -> tuple[np.ndarray, int]:
    """Class codes 0..K-1 (in sorted order of the values' strings) and K."""
    keys = np.asarray([str(value) for value in targets])
    _, codes = np.unique(keys, return_inverse=True)
    return codes, int(codes.max()) + 1 if len(codes) else 0


def groups_from_assignment(client_of: np.ndarray, num_clients: int) -> Partition:
    """Index lists from a client id per example (indices ascending within each client)."""
    order = np.argsort(client_of, kind="stable")
    bounds = np.cumsum(np.bincount(client_of, minlength=num_clients))[:-1]
    return [part.tolist() for part in np.split(order, bounds)]


def split_by_sizes(order: np.ndarray, sizes: np.ndarray) -> Partition:
    """Deal `order` into consecutive chunks of the given sizes, each returned sorted."""
    return [np.sort(part).tolist() for part in np.split(order, np.cumsum(sizes)[:-1])]


def sizes_from_shares(total: int, shares: np.ndarray) -> np.ndarray:
    """Integer sizes summing to `total`, proportional to `shares` (largest remainders get the rest)."""
    exact = shares / shares.sum() * total
    sizes = np.floor(exact).astype(np.int64)
    remainder = total - int(sizes.sum())
    if remainder:
        sizes[np.argsort(-(exact - sizes), kind="stable")[:remainder]] += 1
    return sizes
