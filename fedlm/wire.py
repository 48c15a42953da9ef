"""Messages as bytes: a JSON header, a JSON tensor table, then the tensors' raw little-endian buffers.

Layout (format version 2):

    u64 LE  length of the header     |  header: {"version", "kind", "meta"} as UTF-8 JSON
    u64 LE  length of the table      |  table: [[name, dtype, shape], ...] as UTF-8 JSON
    zero padding to a multiple of 8  |  each tensor's bytes in table order, each padded to 8

Encoding copies each tensor once, into one buffer; decoding checks the header, the table
and that the sizes it declares add up to exactly the bytes received before touching the
payload, then returns tensors that are views into the received buffer (no copy when it is
writable, one copy of immutable `bytes`). Nothing received is ever unpickled or passed to
`torch.load`: the payload is raw numbers, so decoding cannot run code.
"""

from __future__ import annotations

import json
import math
import sys

import torch

from fedlm import gate
from fedlm.errors import WireError

FORMAT_VERSION = 2
ALIGNMENT = 8
MAX_TENSORS = 100_000
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in gate.TENSOR_DTYPES}

if sys.byteorder != "little":  # the buffers are written as this machine holds them
    raise ImportError("fedlm's wire format needs a little-endian machine")


def _padded(length: int) -> int:
    return -(-length // ALIGNMENT) * ALIGNMENT


def encode(kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> memoryview:
    """Serialize named tensors plus JSON-able metadata, stamped with the message kind and version."""
    return frame(json.dumps({"version": FORMAT_VERSION, "kind": kind, "meta": meta}), tensors)


def frame(header: str, tensors: dict[str, torch.Tensor]) -> memoryview:
    """The message bytes for a header (JSON text, written as given) and named tensors, in a
    buffer that torch allocates (no zero-filling first, unlike a bytearray)."""
    flat = {name: tensor.detach().cpu().contiguous().reshape(-1) for name, tensor in tensors.items()}
    table = [
        [name, str(tensor.dtype).removeprefix("torch."), list(tensors[name].shape)] for name, tensor in flat.items()
    ]
    head = _prefixed(header) + _prefixed(json.dumps(table))
    sizes = [tensor.numel() * tensor.element_size() for tensor in flat.values()]
    offset = _padded(len(head))
    payload = torch.empty(offset + sum(_padded(size) for size in sizes), dtype=torch.uint8)
    payload[: len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
    payload[len(head) : offset].zero_()
    for tensor, size in zip(flat.values(), sizes):
        payload[offset : offset + size].copy_(tensor.view(torch.uint8))
        payload[offset + size : offset + _padded(size)].zero_()
        offset += _padded(size)
    return memoryview(payload.numpy())


def _prefixed(text: str) -> bytes:
    body = text.encode()
    return len(body).to_bytes(8, "little") + body


def decode(data: bytes | bytearray | memoryview, expected_kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of `encode`; raises `WireError` for bytes that are not a well-formed
    `expected_kind` message, before any tensor is read."""
    view = memoryview(data).cast("B")
    header_text, position = _section(view, 0, "header")
    header = gate.mapping(gate.parse_json(header_text, "message header"), "message header")
    if "version" not in header or "kind" not in header:
        raise WireError("received bytes are not a fedlm message: its header has no format version and kind")
    if header.get("version") != FORMAT_VERSION:
        raise WireError(
            f"message format version {header.get('version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    if header.get("kind") != expected_kind:
        raise WireError(f"expected a {expected_kind!r} message, received {header.get('kind')!r}")
    table_text, position = _section(view, position, "tensor table")
    entries = _table(gate.parse_json(table_text, "tensor table"))
    offset, layout = _padded(position), []
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        layout.append((name, dtype, shape, offset, size))
        offset += _padded(size)
    if offset != len(view):
        raise WireError(f"the tensor table declares {offset:,} bytes in all, the message has {len(view):,}")
    if view.readonly:
        view = memoryview(bytearray(view))  # tensors must not alias memory nobody may write
    tensors = {}
    for name, dtype, shape, start, size in layout:
        flat = torch.frombuffer(view, dtype=dtype, count=size // dtype.itemsize, offset=start) if size else None
        tensors[name] = torch.empty(shape, dtype=dtype) if flat is None else flat.view(shape)
    return tensors, gate.mapping(header.get("meta"), "message metadata")


def _section(view: memoryview, position: int, what: str) -> tuple[bytes, int]:
    """The length-prefixed bytes at `position`, and where the next section starts."""
    if len(view) < position + 8:
        raise WireError(f"received bytes are not a fedlm message: {len(view)} bytes, too short for its {what}")
    length = int.from_bytes(view[position : position + 8], "little")
    end = position + 8 + length
    if end > len(view):
        raise WireError(f"received bytes are not a fedlm message: a {what} of {length:,} bytes in {len(view):,}")
    return bytes(view[position + 8 : end]), end


def _table(value: object) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The tensor table's entries, each checked: a unique name, a dtype fedlm sends, a shape."""
    if not isinstance(value, list) or len(value) > MAX_TENSORS:
        raise WireError(f"the tensor table must be a list of at most {MAX_TENSORS:,} entries")
    entries, names = [], set()
    for entry in value:
        if not isinstance(entry, list) or len(entry) != 3:
            raise WireError("each tensor table entry must be [name, dtype, shape]")
        name, dtype, shape = gate.text(entry[0], "tensor name"), entry[1], entry[2]
        if name in names:
            raise WireError(f"tensor {name!r} appears twice in the tensor table")
        if dtype not in DTYPES:
            raise WireError(f"tensor {name!r} has dtype {str(dtype)[:40]}, expected one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > 8:
            raise WireError(f"tensor {name!r}: its shape must be a list of at most 8 sizes")
        shape = tuple(gate.integer(size, f"tensor {name!r} shape") for size in shape)
        names.add(name)
        entries.append((name, DTYPES[dtype], shape))
    return entries
