"""The server: `FedServer` (the round loop, `loop.py`), `GlobalModel` (the global parameters and
their layouts, `global_model.py`) and evaluation (`evaluation.py`)."""

from fedlm.server.global_model import LORA_AGGREGATIONS, GlobalModel
from fedlm.server.loop import FedServer

__all__ = ["LORA_AGGREGATIONS", "FedServer", "GlobalModel"]
