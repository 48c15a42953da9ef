"""The federation's data: each client's train and test splits, the server's validation set, and
a public set held back for distillation."""

from __future__ import annotations

from dataclasses import dataclass

from fedlm.data.dataset import TextDataset


@dataclass
class ClientData:
    name: str
    train: TextDataset
    test: TextDataset


@dataclass
class FederatedData:
    clients: list[ClientData]
    validation: TextDataset | None
    public: TextDataset | None = None  # distillation's public set, when held out of the dataset
