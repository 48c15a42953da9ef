"""Pure tensor math on flat float32 vectors: no transformers, no I/O.

Everything here is importable with torch alone and unit-testable on random tensors.
"""

from fedlm.core.params import ParamSpec, flatten, unflatten
from fedlm.core.seeding import derive_seed
from fedlm.core.update import ClientUpdate

__all__ = ["ClientUpdate", "ParamSpec", "derive_seed", "flatten", "unflatten"]
