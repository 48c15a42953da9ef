"""The federation's data: each client's train and test splits, the server's validation set, and
a public set held back for distillation."""

from __future__ import annotations

from dataclasses import dataclass

from fedlm.data.dataset import TextDataset
from fedlm.data.labels import label_key


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

    def label_values(self) -> list[str]:
        """Every label some client trains on, as sorted label keys."""
        return sorted({label_key(label) for client in self.clients for label in client.train.labels})
