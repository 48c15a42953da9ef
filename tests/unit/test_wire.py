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

    monkeypatch.setattr(wire, "FORMAT_VERSION", 2)
    payload = FitIns(torch.zeros(2), {}).to_bytes()
    monkeypatch.setattr(wire, "FORMAT_VERSION", 1)
    with pytest.raises(WireError, match="version 2 is not supported"):
        FitIns.from_bytes(payload)
