import json
import pickle

import pytest
import torch

from fedlm.errors import WireError
from fedlm.protocol import EvaluateIns, EvaluateRes, FitIns, FitRes


def test_messages_round_trip_through_bytes():
    parameters = torch.randn(100)
    ins = FitIns.from_bytes(FitIns(parameters, {"round": 3, "epochs": 1}).to_bytes())
    assert torch.equal(ins.parameters, parameters) and ins.config == {"round": 3, "epochs": 1}
    res = FitRes.from_bytes(FitRes(parameters * 2, 42, {"loss": 0.5}).to_bytes())
    assert torch.equal(res.delta, parameters * 2) and res.num_examples == 42 and res.metrics == {"loss": 0.5}
    ev = EvaluateIns.from_bytes(EvaluateIns(parameters, {}).to_bytes())
    assert torch.equal(ev.parameters, parameters)
    assert EvaluateRes.from_bytes(EvaluateRes(7, {"accuracy": 1.0}).to_bytes()) == EvaluateRes(7, {"accuracy": 1.0})


def test_payload_size_is_the_tensor_bytes_plus_a_small_header():
    payload = FitIns(torch.zeros(1000), {"round": 1}).to_bytes()
    assert 4000 < len(payload) < 4000 + 300


def test_wrong_message_kind_is_rejected():
    with pytest.raises(WireError, match="expected a 'fit_res' message, received 'fit_ins'"):
        FitRes.from_bytes(FitIns(torch.zeros(3), {}).to_bytes())


def test_pickled_bytes_are_never_unpickled():
    class Exploit:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    with pytest.raises(WireError, match="not a fedlm message"):
        FitIns.from_bytes(pickle.dumps(Exploit()))


def test_garbage_and_foreign_safetensors_are_rejected():
    from safetensors.torch import save

    with pytest.raises(WireError):
        FitIns.from_bytes(b"\x00" * 20)
    with pytest.raises(WireError, match="not a fedlm message"):
        FitIns.from_bytes(save({"parameters": torch.zeros(2)}))


def test_a_newer_format_version_is_rejected(monkeypatch):
    from fedlm import wire

    current = wire.FORMAT_VERSION
    monkeypatch.setattr(wire, "FORMAT_VERSION", current + 1)
    payload = FitIns(torch.zeros(2), {}).to_bytes()
    monkeypatch.setattr(wire, "FORMAT_VERSION", current)
    with pytest.raises(WireError, match=f"version {current + 1} is not supported"):
        FitIns.from_bytes(payload)


def test_every_dtype_and_shape_round_trips_as_views_into_the_received_buffer():
    from fedlm import wire

    tensors = {
        "matrix": torch.randn(3, 5),
        "half": torch.randn(7).half(),
        "brain": torch.randn(2, 3).bfloat16(),
        "codes": torch.randint(-128, 127, (11,), dtype=torch.int8),
        "bytes": torch.tensor(list(b"abc"), dtype=torch.uint8),
        "ids": torch.arange(4),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 6).t(),  # not contiguous: sent as its values
    }
    data = wire.encode("fit_res", tensors, {"n": 1})
    assert len(data) % wire.ALIGNMENT == 0
    decoded, meta = wire.decode(data, "fit_res")
    assert meta == {"n": 1} and list(decoded) == list(tensors)
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor), name
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert start <= decoded["matrix"].data_ptr() < start + len(data)  # a view: no copy on receipt
    copied, _ = wire.decode(bytes(data), "fit_res")  # immutable bytes: copied once, never aliased
    assert torch.equal(copied["matrix"], tensors["matrix"])


def test_sizes_that_do_not_add_up_are_rejected_before_the_payload_is_read():
    from fedlm import wire

    data = wire.encode("fit_res", {"delta": torch.zeros(10)}, {})
    size = len(data)
    with pytest.raises(WireError, match=f"declares {size} bytes in all, the message has {size - 4}"):
        wire.decode(data[:-4], "fit_res")
    with pytest.raises(WireError, match=f"declares {size} bytes in all, the message has {size + 8}"):
        wire.decode(bytes(data) + bytes(8), "fit_res")
    header = json.dumps({"version": wire.FORMAT_VERSION, "kind": "fit_res", "meta": {}})
    table_cases = {
        '[["delta", "float64", [2]]]': "dtype float64",
        '[["delta", "float32", [-1]]]': "must be in",
        '[["delta", "float32", [1e3]]]': "must be an integer",
        '[["a", "float32", [1]], ["a", "float32", [1]]]': "appears twice",
        '{"delta": 1}': "must be a list",
        '[["delta", "float32", [1000000000000]]]': "declares 4,000,000,000,[0-9]+ bytes in all",
    }
    for table, message in table_cases.items():
        raw = wire._prefixed(header) + wire._prefixed(table)
        with pytest.raises(WireError, match=message):
            wire.decode(raw + bytes(-len(raw) % 8), "fit_res")
