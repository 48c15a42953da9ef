"""fedlm messages as Flower records: tensors in an `ArrayRecord`, metadata as JSON in a `ConfigRecord`.

Each tensor becomes one Flower `Array` (NumPy's `.npy` format, read back with
`allow_pickle=False`), so parameters travel as Flower arrays built from fedlm's flat float32
buffers and nothing received is ever unpickled. The JSON header carries the fedlm format
version and the message kind, as the in-process wire format does.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlm import wire
from fedlm.errors import WireError
from fedlm.protocol import WireMessage

ARRAYS = "fedlm.arrays"
HEADER = "fedlm.header"
ERROR_KIND = "error"
ALLOWED_DTYPES = ("float32", "float16", "int64", "int32", "int8", "int16", "uint8")  # uint8: byte strings
BFLOAT16 = "bfloat16"  # NumPy has no bfloat16: such tensors travel as their int16 bit patterns

M = TypeVar("M", bound=WireMessage)


def to_record(message: WireMessage) -> RecordDict:
    tensors, meta = message.to_parts()
    return _record(message.KIND, tensors, meta)


def error_record(text: str) -> RecordDict:
    """A reply saying why a client could not do what was asked (shown in the server log)."""
    return _record(ERROR_KIND, {}, {"message": text})


def _record(kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> RecordDict:
    arrays, bfloat16 = {}, []
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            tensor, bfloat16 = tensor.view(torch.int16), [*bfloat16, name]
        arrays[name] = Array(tensor.numpy())
    header = json.dumps({"version": wire.FORMAT_VERSION, "kind": kind, "meta": meta, BFLOAT16: bfloat16})
    return RecordDict({ARRAYS: ArrayRecord(arrays), HEADER: ConfigRecord({"json": header})})


def record_size(record: RecordDict) -> int:
    """Bytes of the serialized arrays plus the JSON header: what fedlm puts on the wire."""
    arrays = record.array_records.get(ARRAYS)
    header = record.config_records.get(HEADER)
    size = 0 if arrays is None else sum(len(array.data) for array in arrays.values())
    return size + (0 if header is None else len(str(header.get("json", ""))))


def from_record(record: RecordDict, message_type: type[M]) -> M:
    """Decode a `message_type` from a Flower record; `WireError` for anything else, including a
    client's error reply (its text becomes the error message)."""
    try:
        header = json.loads(str(record.config_records[HEADER]["json"]))
        version, kind, meta = header["version"], header["kind"], header["meta"]
        arrays = record.array_records[ARRAYS]
    except (KeyError, TypeError, ValueError) as error:
        raise WireError(f"received record is not a fedlm message: {type(error).__name__}: {error}") from None
    if version != wire.FORMAT_VERSION:
        raise WireError(f"message format version {version!r} is not supported (expected {wire.FORMAT_VERSION})")
    if kind == ERROR_KIND:
        raise WireError(str(meta.get("message", "the client reported an error")))
    if kind != message_type.KIND:
        raise WireError(f"expected a {message_type.KIND!r} message, received {kind!r}")
    tensors = {}
    for name, array in arrays.items():
        if array.dtype not in ALLOWED_DTYPES:
            raise WireError(f"array {name!r} has dtype {array.dtype}, expected one of {ALLOWED_DTYPES}")
        try:
            values = array.numpy()  # np.load with allow_pickle=False
        except (TypeError, ValueError) as error:
            raise WireError(f"array {name!r} cannot be read: {error}") from None
        tensors[name] = torch.from_numpy(np.ascontiguousarray(values))
        if name in header.get(BFLOAT16, []):
            if tensors[name].dtype != torch.int16:
                raise WireError(f"array {name!r} is marked bfloat16 but holds {array.dtype}")
            tensors[name] = tensors[name].view(torch.bfloat16)
    try:
        return message_type.from_parts(tensors, meta)
    except (KeyError, TypeError, ValueError) as error:
        raise WireError(f"malformed {kind!r} message: {type(error).__name__}: {error}") from None
