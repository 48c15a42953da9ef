"""Messages as bytes: tensors in safetensors format, metadata as JSON in its header.

Nothing received is ever unpickled or passed to `torch.load`: safetensors bytes hold only raw
buffers plus a JSON header, so decoding cannot run code.
"""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedlm import gate
from fedlm.errors import WireError

FORMAT_VERSION = 1
_HEADER_KEY = "fedlm"


def encode(kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """Serialize named tensors plus JSON-able metadata, stamped with the message kind and version."""
    header = {"version": FORMAT_VERSION, "kind": kind, "meta": meta}
    contiguous = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    return save_safetensors(contiguous, metadata={_HEADER_KEY: json.dumps(header)})


def decode(data: bytes, expected_kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of `encode`; raises `WireError` for bytes that are not a `expected_kind` message
    (the header is checked by the validation gate before any tensor is read)."""
    header_length = int.from_bytes(data[:8], "little")
    if len(data) < 8 or header_length > len(data) - 8:
        raise WireError(f"received bytes are not a fedlm message: {len(data)} bytes, header of {header_length:,}")
    file_header = gate.parse_json(data[8 : 8 + header_length], "message header")
    try:
        header = gate.parse_json(file_header["__metadata__"][_HEADER_KEY], "fedlm header")
    except (KeyError, TypeError) as error:
        raise WireError(f"received bytes are not a fedlm message: no fedlm header ({error})") from None
    header = gate.mapping(header, "fedlm header")
    if header.get("version") != FORMAT_VERSION:
        raise WireError(
            f"message format version {header.get('version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    if header.get("kind") != expected_kind:
        raise WireError(f"expected a {expected_kind!r} message, received {header.get('kind')!r}")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, TypeError) as error:
        raise WireError(f"received bytes are not a fedlm message: {error}") from None
    for name, tensor in tensors.items():
        gate.tensor_dtype(tensor, name)
    return tensors, gate.mapping(header.get("meta"), "message metadata")
