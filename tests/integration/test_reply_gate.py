"""The validation gate: nothing a client sends can crash the server or steer the weights.

Crafted replies (each defect found against the server before the gate) and random ones go
through both transports in one round each, next to honest clients: the round must finish,
aggregate the honest updates, and drop every offender by name with the gate's reason.
"""

from __future__ import annotations

import json
import random
import struct
import uuid

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from conftest import make_records
from fedlm import FedClient, FedServer, wire
from fedlm.client import TrainingOptions
from fedlm.models import load_tokenizer
from fedlm.protocol import ClientInfo, EvaluateIns, FitIns
from fedlm.runtime.flower.records import ARRAYS, HEADER, from_record, to_record
from fedlm.runtime.flower.records import FORMAT_VERSION as RECORD_FORMAT_VERSION
from fedlm.runtime.flower.transport import FlowerTransport
from fedlm.server import GlobalModel
from fedlm.tasks.classification import ClassificationTask, LabelMap, load_classifier

HONEST = ("honest-0", "honest-1")
OPTIONS = {"learning_rate": 3e-3, "max_length": 32, "batch_size": 8}
DECLARED = 24  # training examples every client holds (and declares)


def header(meta: str, kind: str = "fit_res", version: int = wire.FORMAT_VERSION) -> str:
    """A fedlm header around raw JSON text for `meta` (so that it can hold what json.dumps never writes)."""
    return f'{{"version": {version}, "kind": "{kind}", "meta": {meta}}}'


def good_meta(num_examples: str = "10", metrics: str = '{"loss": 0.5}', extra: str = "") -> str:
    return f'{{"num_examples": {num_examples}, "metrics": {metrics}{extra}}}'


def wire_bytes(text: str, tensors: dict[str, torch.Tensor]) -> bytes:
    return bytes(wire.frame(text, tensors))


def crafted_replies(numel: int) -> dict[str, bytes]:
    """Each case as the bytes a client sends in process (a JSON header, a tensor table, raw buffers)."""
    delta = {"delta": torch.zeros(numel)}
    topk = {"delta.indices": torch.zeros(3, dtype=torch.int32), "delta.values": torch.zeros(3)}
    codec = ', "delta_codec": {{"kind": "topk", "fraction": 0.01, "numel": {}}}'
    deep = "[" * 100_000 + "]" * 100_000
    return {
        "metrics-a-string": wire_bytes(header(good_meta(metrics='"x"')), delta),
        "metrics-text-value": wire_bytes(header(good_meta(metrics='{"loss": "abc"}')), delta),
        "metrics-nested": wire_bytes(header(good_meta(metrics='{"loss": {"a": 1}}')), delta),
        "metrics-too-many": wire_bytes(header(good_meta(metrics=json.dumps({f"m{i}": 1 for i in range(5000)}))), delta),
        "examples-infinity": wire_bytes(header(good_meta("Infinity")), delta),
        "examples-nan": wire_bytes(header(good_meta("NaN")), delta),
        "examples-negative": wire_bytes(header(good_meta("-1")), delta),
        "examples-huge": wire_bytes(header(good_meta(str(10**12))), delta),
        "examples-above-declared": wire_bytes(header(good_meta(str(DECLARED + 1))), delta),
        "examples-a-string": wire_bytes(header(good_meta('"5"')), delta),
        "examples-a-bool": wire_bytes(header(good_meta("true")), delta),
        "examples-a-float": wire_bytes(header(good_meta("2.5")), delta),
        "header-a-list": wire_bytes("[1, 2, 3]", delta),
        "header-deeply-nested": wire_bytes(header(good_meta(metrics=deep)), delta),
        "topk-numel-1e11": wire_bytes(header(good_meta(extra=codec.format(10**11))), topk),
        "topk-numel-negative": wire_bytes(header(good_meta(extra=codec.format(-1))), topk),
        "int8-block-1e12": wire_bytes(
            header(good_meta(extra=f', "delta_codec": {{"kind": "int8", "block": {10**12}, "numel": {numel}}}')),
            {"delta.q": torch.zeros(numel, dtype=torch.int8), "delta.scale": torch.ones(1)},
        ),
        "codec-unknown": wire_bytes(
            header(good_meta(extra=f', "delta_codec": {{"kind": "zip", "numel": {numel}}}')), {}
        ),
        "codec-missing-parts": wire_bytes(header(good_meta(extra=codec.format(numel))), {}),
        "delta-float64": wire_bytes(header(good_meta()), {"delta": torch.zeros(numel, dtype=torch.float64)}),
        "delta-bool": wire_bytes(header(good_meta()), {"delta": torch.zeros(numel, dtype=torch.bool)}),
        "delta-too-short": wire_bytes(header(good_meta()), {"delta": torch.zeros(numel - 1)}),
        "delta-2d": wire_bytes(header(good_meta()), {"delta": torch.zeros(1, numel)}),
        "delta-nan": wire_bytes(header(good_meta()), {"delta": torch.full((numel,), float("nan"))}),
        "delta-missing": wire_bytes(header(good_meta()), {}),
        "extra-wrong-size": wire_bytes(header(good_meta()), {**delta, "control_delta": torch.zeros(7)}),
        "not-a-message": b"\x80\x04K\x01." * 10,
        "header-length-lies": struct.pack("<Q", 10**15) + b"{}",
        "wrong-kind": wire_bytes(header(good_meta(), kind="fit_ins"), delta),
    }


def random_replies(numel: int, count: int, seed: int) -> dict[str, bytes]:
    """Random bytes, random JSON headers, and valid headers around random JSON metadata."""
    rng = random.Random(seed)
    replies = {}
    for index in range(count):
        choice = index % 3
        if choice == 0:
            replies[f"random-bytes-{index}"] = rng.randbytes(rng.randrange(0, 400))
        elif choice == 1:
            replies[f"random-header-{index}"] = wire_bytes(json.dumps(random_json(rng)), {"delta": torch.zeros(numel)})
        else:
            meta = json.dumps(random_json(rng))
            replies[f"random-meta-{index}"] = wire_bytes(header(meta), {"delta": torch.zeros(numel)})
    return replies


def random_json(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, 1, -1, 10**12, rng.randrange(-(10**6), 10**6)])
    if kind == "float":
        return rng.uniform(-1e9, 1e9)
    if kind == "str":
        return rng.choice(["", "x", "num_examples", "metrics", "delta", "\u0000", "é" * 300])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["num_examples", "metrics", "delta_codec", "version", "kind", "meta", "loss", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


class RawReply:
    """What a malicious in-process client returns: bytes of its choosing."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def to_bytes(self) -> bytes:
        return self.data


def loopback_federation(tiny_model_dir, offenders: dict[str, bytes]) -> FedServer:
    model = load_classifier(str(tiny_model_dir), num_labels=3, seed=0)
    clients = [
        FedClient(make_records(DECLARED, seed=index), model, name=name, **OPTIONS)
        for index, name in enumerate([*HONEST, *offenders])
    ]
    for client in clients:
        if client.name in offenders:
            client.fit = lambda ins, data=offenders[client.name]: RawReply(data)
    return FedServer(clients)


def round_reasons(server: FedServer, offenders: dict) -> dict[str, str]:
    """One round: the honest updates aggregated into a finite model that moved, every offender
    dropped with a reason; the reasons by client."""
    before = server.global_params.clone()
    record = server.fit(rounds=1, clients_per_evaluation=0)[0]
    reasons = {item["client"]: item["reason"] for item in record["dropped"]}
    assert set(reasons) == set(offenders) and all(reasons.values())
    assert record["clients"] == len(HONEST) and not record.get("skipped")
    assert torch.isfinite(server.global_params).all() and not torch.equal(server.global_params, before)
    return reasons


@pytest.mark.parametrize("cases", ["crafted", "random"])
def test_loopback_round_drops_every_malformed_reply_and_aggregates_the_honest_ones(tiny_model_dir, cases, caplog):
    probe = loopback_federation(tiny_model_dir, {})
    numel = probe.global_model.spec.numel
    offenders = crafted_replies(numel) if cases == "crafted" else random_replies(numel, 60, seed=7)
    reasons = round_reasons(loopback_federation(tiny_model_dir, offenders), offenders)
    assert all("Traceback" not in message for message in caplog.messages)
    if cases == "crafted":
        assert "declares 100,000,000,000 values" in reasons["topk-numel-1e11"]
        assert (
            "expected 1 to 24" in reasons["examples-huge"] and "expected 1 to 24" in reasons["examples-above-declared"]
        )
        assert "finite number" in reasons["metrics-text-value"] and "not a JSON number" in reasons["examples-infinity"]
        assert "nests deeper" in reasons["header-deeply-nested"] and "dtype float64" in reasons["delta-float64"]
        assert "int8 codec block" in reasons["int8-block-1e12"] and "NaN" in reasons["delta-nan"]


def test_an_evaluation_reply_that_lies_is_left_out_of_the_client_metrics(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), num_labels=3, seed=0)
    names = [*HONEST, "no-accuracy", "too-many-examples", "accuracy-above-one"]
    clients = [
        FedClient(
            make_records(DECLARED, seed=i), model, name=name, test_dataset=make_records(6, seed=50 + i), **OPTIONS
        )
        for i, name in enumerate(names)
    ]
    evaluation = {
        "no-accuracy": '{"num_examples": 6, "metrics": {"macro_f1": 0.5}}',
        "too-many-examples": '{"num_examples": 1000000, "metrics": {"accuracy": 1.0, "macro_f1": 1.0}}',
        "accuracy-above-one": '{"num_examples": 6, "metrics": {"accuracy": 7.0, "macro_f1": 0.5}}',
    }
    for client in clients[len(HONEST) :]:
        text = header(evaluation[client.name], kind="evaluate_res")
        client.evaluate = lambda ins, text=text: RawReply(wire_bytes(text, {}))
    metrics = FedServer(clients).evaluate_global_model(None)
    assert metrics["clients_evaluated"] == len(HONEST)
    assert [result["client"] for result in metrics["client_test"]] == list(HONEST)


# ---- Flower: the same gate on records -----------------------------------------------------------


def npy(header_text: str, payload: bytes) -> bytes:
    """A `.npy` file with a hand-written header (version 1.0)."""
    padded = header_text + " " * (-(len(header_text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(padded)) + padded.encode("latin1") + payload


def record_header(meta: str, kind: str = "fit_res") -> str:
    return header(meta, kind, version=RECORD_FORMAT_VERSION)


def record(text, arrays: dict[str, Array] | None = None) -> RecordDict:
    return RecordDict({ARRAYS: ArrayRecord(arrays or {}), HEADER: ConfigRecord({"json": text})})


def crafted_records(numel: int) -> dict[str, RecordDict]:
    meta = good_meta()
    delta = Array(np.zeros(numel, dtype=np.float32))

    def raw_array(header_text: str, payload: bytes, dtype: str = "float32") -> Array:
        return Array(dtype=dtype, shape=(numel,), stype="numpy.ndarray", data=npy(header_text, payload))

    huge = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"
    return {
        "npy-shape-1e12": record(record_header(meta), {"delta": raw_array(huge, b"\x00" * 16)}),
        "npy-big-endian": record(
            record_header(meta),
            {
                "delta": raw_array(
                    f"{{'descr': '>f4', 'fortran_order': False, 'shape': ({numel},), }}", b"\0" * 4 * numel
                )
            },
        ),
        "npy-complex": record(
            record_header(meta),
            {
                "delta": raw_array(
                    f"{{'descr': '<c8', 'fortran_order': False, 'shape': ({numel},), }}", b"\0" * 8 * numel
                )
            },
        ),
        "npy-object-pickle": record(
            record_header(meta),
            {"delta": raw_array("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", b"\x80")},
        ),
        "npy-not-a-header": record(record_header(meta), {"delta": raw_array("__import__('os')", b"")}),
        "npy-short-data": record(
            record_header(meta),
            {"delta": raw_array(f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({numel},), }}", b"\0" * 8)},
        ),
        "stype-pickle": record(
            record_header(meta), {"delta": Array(dtype="float32", shape=(3,), stype="pickle", data=b"x")}
        ),
        "header-a-list": record("[1, 2]", {"delta": delta}),
        "header-not-a-string": RecordDict({ARRAYS: ArrayRecord({"delta": delta}), HEADER: ConfigRecord({"json": 7})}),
        "header-deeply-nested": record(record_header("[" * 100_000 + "]" * 100_000), {"delta": delta}),
        "examples-infinity": record(record_header(good_meta("Infinity")), {"delta": delta}),
        "metrics-text-value": record(record_header(good_meta(metrics='{"loss": "abc"}')), {"delta": delta}),
        "examples-huge": record(record_header(good_meta(str(10**12))), {"delta": delta}),
        "no-fedlm-parts": RecordDict(),
        "bfloat16-list-not-a-list": record(record_header(meta)[:-1] + ', "bfloat16": 5}', {"delta": delta}),
    }


def random_records(numel: int, count: int, seed: int) -> dict[str, RecordDict]:
    rng = random.Random(seed)
    records = {}
    for index in range(count):
        data = rng.randbytes(rng.randrange(0, 300))
        if index % 2:
            data = npy(rng.choice(["{'descr': '<f4', 'shape': (3,)}", "{}", "x" * 50, "{'descr': 5}"]), data)
        array = Array(dtype="float32", shape=(numel,), stype="numpy.ndarray", data=data)
        text = json.dumps(random_json(rng)) if index % 3 else record_header(json.dumps(random_json(rng)))
        records[f"random-{index}"] = record(text, {"delta": array})
    return records


class InProcessGrid:
    """Flower's Grid as `FlowerTransport` uses it (push, then pull), with each node a function in
    this process that answers a real `Message` with a real `Message`: the records and the gate are
    Flower's and fedlm's own, only the SuperLink's network hop is left out."""

    def __init__(self, nodes) -> None:
        self.nodes = nodes
        self.replies: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's own simulation engine does
            self.replies[message.metadata.message_id] = self.nodes[message.metadata.dst_node_id](message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(message_id) for message_id in message_ids if message_id in self.replies]


@pytest.fixture
def flower_identity(monkeypatch):
    """What a ServerApp process has set when it creates messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def flower_federation(tiny_model_dir, offenders: dict[str, RecordDict]) -> FedServer:
    model = load_classifier(str(tiny_model_dir), num_labels=3, seed=0)
    label_map = LabelMap.from_values(["business", "sport", "tech"])
    honest = {
        name: FedClient(make_records(DECLARED, seed=i), model, name=name, **OPTIONS) for i, name in enumerate(HONEST)
    }
    names = [*honest, *offenders]
    node_ids = {name: 100 + index for index, name in enumerate(names)}

    def node(name: str):
        def answer(message: Message) -> Message:
            if name in offenders:
                return Message(offenders[name], reply_to=message)
            client = honest[name]
            client.set_metadata(label_map)
            if message.metadata.message_type == "train":
                return Message(to_record(client.fit(from_record(message.content, FitIns))), reply_to=message)
            return Message(to_record(client.evaluate(from_record(message.content, EvaluateIns))), reply_to=message)

        return answer

    grid = InProcessGrid({node_ids[name]: node(name) for name in names})
    transport = FlowerTransport(grid, node_ids, label_map.label2id)
    infos = [ClientInfo(name, DECLARED, 0, ["business", "sport", "tech"]) for name in names]
    global_model = GlobalModel(
        model, load_tokenizer(str(tiny_model_dir)), ClassificationTask(), label_map, TrainingOptions(**OPTIONS)
    )
    return FedServer(infos, transport=transport, global_model=global_model)


@pytest.mark.parametrize("cases", ["crafted", "random"])
def test_flower_round_drops_every_malformed_record_and_aggregates_the_honest_ones(
    tiny_model_dir, flower_identity, cases
):
    numel = flower_federation(tiny_model_dir, {}).global_model.spec.numel
    offenders = crafted_records(numel) if cases == "crafted" else random_records(numel, 40, seed=11)
    reasons = round_reasons(flower_federation(tiny_model_dir, offenders), offenders)
    if cases == "crafted":
        assert "declares shape [1000000000000]" in reasons["npy-shape-1e12"]
        assert "little-endian" in reasons["npy-big-endian"] and "complex64" in reasons["npy-complex"]
        assert "nests deeper" in reasons["header-deeply-nested"] and "expected 1 to 24" in reasons["examples-huge"]


def test_a_node_that_reports_too_many_labels_is_refused_at_decoding():
    labels = [f"l{index}" for index in range(100_001)]
    with pytest.raises(Exception, match="more than the limit of 100,000"):
        from_record(to_record(ClientInfo("big", 10, 0, labels)), ClientInfo)


def test_a_node_whose_labels_cannot_join_the_label_map_is_excluded_by_name():
    from fedlm.runtime.flower.server_app import _with_usable_targets

    infos = [(1, ClientInfo("a", 10, 0, ["0", "1"])), (2, ClientInfo("b", 10, 0, ["1", "50000"]))]
    usable, failures = _with_usable_targets(infos, ClassificationTask(max_labels=10_000))
    assert [info.name for _, info in usable] == ["a"]
    assert len(failures) == 1 and failures[0].startswith("node 2 (client b):") and "50000" in failures[0]


def test_max_client_examples_caps_the_weight_an_update_counts_for(tiny_model_dir):
    from fedlm.core.strategies import FedAvg

    class Recording(FedAvg):
        def aggregate(self, global_params, updates):
            self.counts = [update.num_examples for update in updates]
            return super().aggregate(global_params, updates)

    model = load_classifier(str(tiny_model_dir), num_labels=3, seed=0)
    clients = [FedClient(make_records(n, seed=n), model, name=f"c{n}", **OPTIONS) for n in (40, 8)]
    strategy = Recording()
    FedServer(clients, strategy, max_client_examples=10).fit(rounds=1, clients_per_evaluation=0)
    assert strategy.counts == [10, 8]
