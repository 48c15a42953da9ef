"""Partitioners split one dataset into clients; each returns one index list per client."""

from fedlm.data.partition.iid import IidPartitioner

__all__ = ["IidPartitioner"]
