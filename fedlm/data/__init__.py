"""Loading client datasets, bundled datasets and partitioners."""

from fedlm.data.bundled import BUNDLED_DATASETS, load_bundled_dataset
from fedlm.data.dataset import TextDataset, concatenate, load_text_dataset
from fedlm.data.partition import (
    PARTITIONERS,
    DirichletPartitioner,
    IidPartitioner,
    NaturalPartitioner,
    Partitioner,
    QuantityPartitioner,
    ShardsPartitioner,
    client_sources,
    load_predefined,
)
from fedlm.data.split import holdout_split

__all__ = [
    "BUNDLED_DATASETS",
    "PARTITIONERS",
    "DirichletPartitioner",
    "IidPartitioner",
    "NaturalPartitioner",
    "Partitioner",
    "QuantityPartitioner",
    "ShardsPartitioner",
    "client_sources",
    "concatenate",
    "load_predefined",
    "TextDataset",
    "holdout_split",
    "load_bundled_dataset",
    "load_text_dataset",
]
