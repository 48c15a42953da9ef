"""Models: bundled pretrained models, loading, and the federated parameter vector."""

from fedlm.models.federated import federated_spec, get_federated_vector, set_federated_vector
from fedlm.models.loading import load_pretrained, load_tokenizer
from fedlm.models.registry import BUNDLED_MODELS, resolve_model_path

__all__ = [
    "BUNDLED_MODELS",
    "federated_spec",
    "get_federated_vector",
    "load_pretrained",
    "load_tokenizer",
    "resolve_model_path",
    "set_federated_vector",
]
