"""Loading client datasets, bundled datasets, label maps and partitioners."""

from fedlm.data.bundled import BUNDLED_DATASETS, load_bundled_dataset
from fedlm.data.dataset import TextDataset, load_text_dataset
from fedlm.data.labels import LabelMap
from fedlm.data.partition import IidPartitioner
from fedlm.data.split import holdout_split

__all__ = [
    "BUNDLED_DATASETS",
    "IidPartitioner",
    "LabelMap",
    "TextDataset",
    "holdout_split",
    "load_bundled_dataset",
    "load_text_dataset",
]
