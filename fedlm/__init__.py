"""fedlm: federated fine-tuning and federated distillation of pretrained language models.

Names are imported on first use, so `import fedlm.core` stays free of transformers and I/O libraries.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

if "torch" not in sys.modules:  # read by PyTorch at its first allocation
    # large CPU tensors on transparent huge pages: a fresh 91 MB vector (a delta, a message, an
    # optimizer's state) then faults in 2 MB pages instead of 4 KB ones, 3-4x faster to fill;
    # set THP_MEM_ALLOC_ENABLE=0 to opt out
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

_EXPORTS = {
    "FedClient": "fedlm.client",
    "TrainingOptions": "fedlm.client",
    "FedServer": "fedlm.server",
    "register_strategy": "fedlm.plugins",
    "register_task": "fedlm.plugins",
    "Task": "fedlm.tasks",
    **{
        name: "fedlm.core.strategies"
        for name in ("FedAvg", "FedAvgM", "FedProx", "FedAdagrad", "FedAdam", "FedYogi", "Scaffold", "Strategy")
    },
    **{name: "fedlm.core.robust" for name in ("CoordinateMedian", "TrimmedMean", "Krum")},
    "FederatedDistillation": "fedlm.algorithms",
    "EnsembleDistillation": "fedlm.algorithms",
    "SampleLevelDP": "fedlm.privacy.dp_sgd",
    "ClientError": "fedlm.errors",
    "ConfigError": "fedlm.errors",
    "DatasetError": "fedlm.errors",
    "FedlmError": "fedlm.errors",
    "ModelError": "fedlm.errors",
    "WireError": "fedlm.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedlm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
