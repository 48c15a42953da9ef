"""Federated algorithms over the global model: what clients send and how the server turns it into
the next global parameters. `WeightAveraging` (the default: any strategy over weight updates),
`FederatedDistillation` (outputs on a public set, a student trained on them), its decoder form
`DecoderDistillation` (top-k next-token log-probabilities) and `EnsembleDistillation` (FedDF:
averaging, then distillation from the clients' ensemble)."""

from fedlm.algorithms.averaging import WeightAveraging
from fedlm.algorithms.decoder_distillation import DecoderDistillation
from fedlm.algorithms.distillation import DistillationSettings, EnsembleDistillation, FederatedDistillation, PublicSet

__all__ = [
    "DecoderDistillation", "DistillationSettings", "EnsembleDistillation", "FederatedDistillation", "PublicSet",
    "WeightAveraging",
]  # fmt: skip
