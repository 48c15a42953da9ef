"""Partitioners split one dataset into clients; each returns one index list per client."""

from fedlm.data.partition.base import Partition, Partitioner
from fedlm.data.partition.dirichlet import DirichletPartitioner
from fedlm.data.partition.iid import IidPartitioner
from fedlm.data.partition.natural import NaturalPartitioner
from fedlm.data.partition.predefined import client_sources, load_predefined
from fedlm.data.partition.quantity import QuantityPartitioner
from fedlm.data.partition.shards import ShardsPartitioner

PARTITIONERS: dict[str, type[Partitioner]] = {
    "iid": IidPartitioner,
    "dirichlet": DirichletPartitioner,
    "quantity": QuantityPartitioner,
    "shards": ShardsPartitioner,
    "natural": NaturalPartitioner,
}

__all__ = [
    "PARTITIONERS",
    "DirichletPartitioner",
    "IidPartitioner",
    "NaturalPartitioner",
    "Partition",
    "Partitioner",
    "QuantityPartitioner",
    "ShardsPartitioner",
    "client_sources",
    "load_predefined",
]
