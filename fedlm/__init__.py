"""fedlm: federated fine-tuning and federated distillation of pretrained language models."""

from fedlm.client import FedClient, TrainingOptions
from fedlm.core.strategies import FedAvg, Strategy
from fedlm.errors import ClientError, ConfigError, DatasetError, FedlmError, ModelError, WireError
from fedlm.server import FedServer

__version__ = "0.1.0"

__all__ = [
    "ClientError",
    "ConfigError",
    "DatasetError",
    "FedAvg",
    "FedClient",
    "FedServer",
    "FedlmError",
    "ModelError",
    "Strategy",
    "TrainingOptions",
    "WireError",
    "__version__",
]
