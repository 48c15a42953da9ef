"""fedlm messages as Flower records: tensors in an `ArrayRecord`, metadata as JSON in a `ConfigRecord`.

Each tensor becomes one Flower `Array` (NumPy's `.npy` format, read back with
`allow_pickle=False`), so parameters travel as Flower arrays built from fedlm's flat float32
buffers and nothing received is ever unpickled. The JSON header carries the fedlm format
version of this record layout and the message kind.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlm import gate
from fedlm.errors import WireError
from fedlm.protocol import WireMessage

ARRAYS = "fedlm.arrays"
HEADER = "fedlm.header"
ERROR_KIND = "error"
ALLOWED_DTYPES = ("float32", "float16", "int64", "int32", "int8", "int16", "uint8")  # uint8: byte strings
# the record layout (arrays + JSON header), versioned apart from the in-process wire format
FORMAT_VERSION = 1
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
    header = json.dumps({"version": FORMAT_VERSION, "kind": kind, "meta": meta, BFLOAT16: bfloat16})
    return RecordDict({ARRAYS: ArrayRecord(arrays), HEADER: ConfigRecord({"json": header})})


def record_size(record: RecordDict) -> int:
    """Bytes of the serialized arrays plus the JSON header: what fedlm puts on the wire."""
    arrays = record.array_records.get(ARRAYS)
    header = record.config_records.get(HEADER)
    size = 0 if arrays is None else sum(len(array.data) for array in arrays.values())
    return size + (0 if header is None else len(str(header.get("json", ""))))


def from_record(record: RecordDict, message_type: type[M]) -> M:
    """Decode a `message_type` from a Flower record; `WireError` for anything else, including a
    client's error reply (its text becomes the error message). Everything is checked by the
    validation gate (`fedlm.gate`) before it is used: the JSON header's size and nesting, and each
    array's `.npy` header (dtype, byte order, shape against the bytes it has) before it is read."""
    try:
        text = record.config_records[HEADER]["json"]
        arrays = record.array_records[ARRAYS]
    except (KeyError, TypeError) as error:
        raise WireError(f"received record is not a fedlm message: {type(error).__name__}: {error}") from None
    if not isinstance(text, str):
        raise WireError(f"received record is not a fedlm message: its header is a {type(text).__name__}")
    header = gate.mapping(gate.parse_json(text, "record header"), "record header")
    version, kind, meta = header.get("version"), header.get("kind"), gate.mapping(header.get("meta"), "metadata")
    if version != FORMAT_VERSION:
        raise WireError(f"message format version {version!r} is not supported (expected {FORMAT_VERSION})")
    if kind == ERROR_KIND:
        raise WireError(str(meta.get("message", "the client reported an error"))[:2000])
    if kind != message_type.KIND:
        raise WireError(f"expected a {message_type.KIND!r} message, received {kind!r:.60}")
    bfloat16 = header.get(BFLOAT16, [])
    if not isinstance(bfloat16, list):
        raise WireError("record header: the bfloat16 list is not a list")
    tensors = {}
    for name, array in arrays.items():
        tensors[name] = torch.from_numpy(_read_array(name, array))
        if name in bfloat16:
            if tensors[name].dtype != torch.int16:
                raise WireError(f"array {name!r} is marked bfloat16 but holds {tensors[name].dtype}")
            tensors[name] = tensors[name].view(torch.bfloat16)
    try:
        return message_type.from_parts(tensors, meta)
    except WireError as error:
        raise WireError(f"malformed {kind!r} message: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise WireError(f"malformed {kind!r} message: {type(error).__name__}: {error}") from None


def _read_array(name: str, array: Array) -> np.ndarray:
    """The values of a Flower `Array` in NumPy's `.npy` format, read without pickle and without
    allocating more than its bytes: the header must declare an allowed little-endian dtype, C
    order, and a shape whose size is exactly the data that follows it."""
    data = array.data
    if array.stype != "numpy.ndarray" or not isinstance(data, bytes):
        raise WireError(f"array {name!r} cannot be read: it is not a NumPy array (stype {array.stype!r:.40})")
    handle = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
    except (ValueError, SyntaxError, TypeError, OverflowError, MemoryError) as error:
        raise WireError(f"array {name!r} has no valid .npy header: {error}") from None
    if dtype.name not in ALLOWED_DTYPES or dtype.byteorder == ">" or fortran_order:
        raise WireError(
            f"array {name!r} has dtype {dtype.name} ({dtype.str}{', Fortran order' if fortran_order else ''}); expected a "
            f"little-endian C-order array of {', '.join(ALLOWED_DTYPES)}"
        )
    count = math.prod(shape)
    if count * dtype.itemsize != len(data) - handle.tell():
        raise WireError(
            f"array {name!r} declares shape {list(shape)} ({count * dtype.itemsize:,} bytes) but carries "
            f"{len(data) - handle.tell():,} bytes"
        )
    values = np.frombuffer(data, dtype=dtype.newbyteorder("<"), count=count, offset=handle.tell())
    return values.reshape(shape).copy()  # writable, owned
