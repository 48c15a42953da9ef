"""Federated algorithms over the global model: what clients send and how the server turns it into
the next global parameters. `WeightAveraging` (the default: any strategy over weight updates),
`FederatedDistillation` (outputs on a public set, a student trained on them) and
`EnsembleDistillation` (FedDF: averaging, then distillation from the clients' ensemble)."""

from fedlm.algorithms.averaging import WeightAveraging
from fedlm.algorithms.distillation import DistillationSettings, EnsembleDistillation, FederatedDistillation, PublicSet

__all__ = ["DistillationSettings", "EnsembleDistillation", "FederatedDistillation", "PublicSet", "WeightAveraging"]
