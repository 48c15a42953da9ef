"""Natural partitioning: one client per value of a column (author, user, language, hospital)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from fedlm.data.partition.base import Partition, Partitioner, encode_targets, groups_from_assignment


class NaturalPartitioner(Partitioner):
    """Groups examples by the value of `column`; clients are named by the value, in sorted order."""

    def __init__(self, column: str) -> None:
        self.column = column

    def partition(self, targets: Sequence[Hashable]) -> Partition:
        codes, num_groups = encode_targets(targets)
        return groups_from_assignment(codes, num_groups)

    def client_names(self, targets: Sequence[Hashable]) -> list[str]:
        return np.unique(np.asarray([str(value) for value in targets])).tolist()
