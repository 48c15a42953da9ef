"""The client: `FedClient` (one participant's data and its answers to the server) and
`TrainingOptions`."""

from fedlm.client.fed_client import FedClient
from fedlm.client.local_training import TrainingOptions

__all__ = ["FedClient", "TrainingOptions"]
