"""The server: `FedServer` (the round loop, `loop.py`), `GlobalModel` (the global parameters and
their layouts, `global_model.py`) and evaluation (`evaluation.py`)."""

from fedlm.server.evaluation import CLIENT_METRICS
from fedlm.server.global_model import LORA_AGGREGATIONS, GlobalModel
from fedlm.server.loop import FedServer

__all__ = ["CLIENT_METRICS", "LORA_AGGREGATIONS", "FedServer", "GlobalModel"]
