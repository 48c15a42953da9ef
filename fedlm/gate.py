"""The validation gate: everything a client sends is checked here before anything else reads it.

A reply passes three checks, each of which turns any problem into a `WireError` whose text says
what was wrong (the round loop drops the client with that reason), never another exception:

- decoding (`fedlm.wire` in process, `fedlm.runtime.flower.records` on Flower): a JSON header of
  bounded size and nesting that holds only finite numbers (`parse_json`), tensors of an allowed
  dtype whose declared size matches their bytes, checked before anything is allocated;
- message fields (`from_parts` of each message in `fedlm.protocol`): the type and range of every
  header field (`integer`, `text`, `metrics`, ...);
- the round (`checked_update`): the update against the server's own knowledge: the vector's size
  (before a compressed update is decoded), its dtype and finite values, and a number of examples
  no larger than what the client declared when it joined.

Secure and homomorphic aggregation check their own protocol messages against the shapes the
protocol expects, with the same helpers (`fedlm.channels.secure`, `fedlm.channels.homomorphic`).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import torch

from fedlm.core.compression import Compressed
from fedlm.errors import WireError

if TYPE_CHECKING:
    from fedlm.protocol import EvaluateRes, FitRes

MAX_HEADER_BYTES = 16 << 20  # a message's JSON header (label maps and configs are far smaller)
MAX_JSON_DEPTH = 32
MAX_METRICS = 256  # entries in one reply's metrics
MAX_TEXT = 256  # characters of a name, a label or a metric's name
MAX_COUNT = 2**53  # example counts and vector sizes: exact in JSON's doubles
TENSOR_DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
)  # fmt: skip


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (only finite numbers may be sent)")


def parse_json(data: str | bytes, what: str) -> Any:
    """`data` parsed as strict JSON: at most `MAX_HEADER_BYTES`, nested at most `MAX_JSON_DEPTH`
    levels, no NaN or Infinity."""
    if len(data) > MAX_HEADER_BYTES:
        raise WireError(f"{what} has {len(data):,} bytes, more than the limit of {MAX_HEADER_BYTES:,}")
    try:
        value = json.loads(data, parse_constant=_no_constants)
    except RecursionError:
        raise WireError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, TypeError) as error:
        raise WireError(f"{what} is not valid JSON: {error}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise WireError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _depth(value: Any) -> int:
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:  # deeper is refused anyway
                pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def mapping(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{field} must be a JSON object, got {type(value).__name__}")
    return value


def integer(value: Any, field: str, minimum: int = 0, maximum: int = MAX_COUNT) -> int:
    """`value` if it is a JSON integer in [minimum, maximum] (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"{field} must be an integer, got {type(value).__name__} {_short(value)}")
    if not minimum <= value <= maximum:
        raise WireError(f"{field} must be in [{minimum}, {maximum}], got {value}")
    return value


def optional_integer(value: Any, field: str, minimum: int = 0, maximum: int = MAX_COUNT) -> int | None:
    return None if value is None else integer(value, field, minimum, maximum)


def number(value: Any, field: str) -> float:
    """`value` if it is a finite JSON number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise WireError(f"{field} must be a finite number, got {type(value).__name__} {_short(value)}")
    return value


def text(value: Any, field: str, max_length: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise WireError(f"{field} must be a string, got {type(value).__name__}")
    if not value or len(value) > max_length or not value.isprintable():
        raise WireError(f"{field} must be 1 to {max_length} printable characters, got {_short(value)}")
    return value


def text_list(value: Any, field: str, max_items: int) -> list[str]:
    if not isinstance(value, list):
        raise WireError(f"{field} must be a list, got {type(value).__name__}")
    if len(value) > max_items:
        raise WireError(f"{field} has {len(value):,} entries, more than the limit of {max_items:,}")
    return [text(item, f"{field}[{index}]") for index, item in enumerate(value)]


def metrics(value: Any, field: str = "metrics") -> dict[str, float]:
    """A flat JSON object of at most `MAX_METRICS` finite numbers with short names."""
    value = mapping(value, field)
    if len(value) > MAX_METRICS:
        raise WireError(f"{field} has {len(value):,} entries, more than the limit of {MAX_METRICS}")
    return {text(key, f"{field} name"): number(item, f"{field}[{key!r}]") for key, item in value.items()}


def tensor_dtype(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.dtype not in TENSOR_DTYPES:
        allowed = ", ".join(str(dtype).removeprefix("torch.") for dtype in TENSOR_DTYPES)
        raise WireError(f"tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {allowed}")
    return tensor


def byte_string(tensors: dict[str, Any], name: str, length: int | None = None) -> torch.Tensor:
    """Tensor `name` if it is a byte string (1-D uint8) of `length` bytes (any when None)."""
    value = tensors.get(name)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise WireError(f"{name!r} must be a byte string (a 1-D uint8 tensor)")
    if length is not None and value.numel() != length:
        raise WireError(f"{name!r} must hold {length} bytes, got {value.numel()}")
    return value


def checked_update(
    reply: FitRes, numel: int, max_examples: int
) -> tuple[torch.Tensor, int, dict[str, float], dict[str, torch.Tensor]]:
    """A training reply's (delta, num_examples, metrics, extras), once the delta and every extra
    vector is a finite float32 vector of `numel` values (a compressed delta is decoded only after
    its declared size matched) and `num_examples` is in [1, max_examples]."""

    if not 1 <= reply.num_examples <= max_examples:
        raise WireError(
            f"update reports {reply.num_examples:,} training examples, expected 1 to {max_examples:,} "
            "(what the client declared when it joined)"
        )
    delta = reply.delta
    if isinstance(delta, Compressed):
        if delta.numel != numel:
            raise WireError(f"compressed update declares {delta.numel:,} values, expected {numel:,}")
        try:
            delta = delta.decode()
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise WireError(f"compressed update cannot be decoded: {type(error).__name__}: {error}") from None
    for name, vector in {"update": delta, **reply.extras}.items():
        if vector.dtype != torch.float32 or vector.dim() != 1 or vector.numel() != numel:
            raise WireError(
                f"{name} has dtype {vector.dtype} and shape {list(vector.shape)}, expected float32 [{numel}]"
            )
        if not torch.isfinite(vector.sum()) and not torch.isfinite(vector).all():  # fast path first
            raise WireError(f"{name} contains NaN or infinite values")
    return delta, reply.num_examples, reply.metrics, reply.extras


def checked_evaluation(
    reply: EvaluateRes, max_examples: int, required: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """An evaluation reply's metrics, once its example count is at most the client's declared
    test examples and a reply with examples holds every `required` metric within its (low, high)."""
    if reply.num_examples > max_examples:
        raise WireError(
            f"evaluation reports {reply.num_examples:,} test examples, the client declared {max_examples:,}"
        )
    if reply.num_examples == 0:
        return {}
    for name, (low, high) in required.items():
        value = reply.metrics.get(name)
        if not (isinstance(value, int | float) and low <= value <= high):
            raise WireError(f"evaluation metric {name!r} is missing or outside [{low:g}, {high:g}], got {value!r}")
    return reply.metrics


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
