"""fedlm messages as Flower records: exact round trips, and refusal of anything else."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlm.errors import WireError
from fedlm.protocol import ClientInfo, EvaluateRes, FitIns, FitRes
from fedlm.runtime.flower.records import ARRAYS, HEADER, error_record, from_record, record_size, to_record


def test_fit_messages_round_trip_exactly():
    ins = FitIns(torch.randn(1000), {"round": 2, "labels": {"a": 0, "b": 1}}, {"server_control": torch.randn(1000)})
    back = from_record(to_record(ins), FitIns)
    assert torch.equal(back.parameters, ins.parameters) and torch.equal(
        back.tensors["server_control"], ins.tensors["server_control"]
    )
    assert back.config == ins.config
    result = FitRes(torch.randn(10), 7, {"loss": 0.5}, {"control_delta": torch.randn(10)})
    back = from_record(to_record(result), FitRes)
    assert torch.equal(back.delta, result.delta) and back.num_examples == 7 and back.metrics == {"loss": 0.5}
    info = ClientInfo("clinic-a", 40, 4, ["x", "y"])
    assert from_record(to_record(info), ClientInfo) == info


def test_record_size_counts_array_bytes_and_header():
    record = to_record(FitRes(torch.zeros(1000), 1))
    header = len(str(record.config_records[HEADER]["json"]))
    assert record_size(record) == len(record.array_records[ARRAYS]["delta"].data) + header
    assert record_size(record) > 4000


def test_an_error_reply_becomes_a_wire_error_with_its_text():
    with pytest.raises(WireError, match="client a: DatasetError: no such file /data/a.csv"):
        from_record(error_record("client a: DatasetError: no such file /data/a.csv"), FitRes)


def _record(header: dict, arrays: dict) -> RecordDict:
    return RecordDict({ARRAYS: ArrayRecord(arrays), HEADER: ConfigRecord({"json": json.dumps(header)})})


@pytest.mark.parametrize(
    ("header", "arrays", "problem"),
    [
        ({"version": 1, "kind": "evaluate_res", "meta": {}}, {}, "expected a 'fit_res' message"),
        ({"version": 99, "kind": "fit_res", "meta": {}}, {}, "version 99"),
        ({"version": 1, "kind": "fit_res", "meta": {"num_examples": 1, "metrics": {}}}, {}, "malformed"),
        (
            {"version": 1, "kind": "fit_res", "meta": {"num_examples": 1, "metrics": {}}},
            {"delta": Array(np.zeros(3, dtype=np.float64))},
            "dtype float64",
        ),
        (
            {"version": 1, "kind": "fit_res", "meta": {"num_examples": 1, "metrics": {}}},
            {"delta": Array(dtype="float32", shape=(3,), stype="pickle", data=b"\x80\x04K\x01.")},
            "cannot be read",
        ),
    ],
)
def test_records_that_are_not_valid_fedlm_messages_are_refused(header, arrays, problem):
    with pytest.raises(WireError, match=problem):
        from_record(_record(header, arrays), FitRes)


def test_a_record_without_fedlm_parts_is_refused():
    with pytest.raises(WireError, match="not a fedlm message"):
        from_record(RecordDict(), EvaluateRes)
