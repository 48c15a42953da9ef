"""fedlm's Flower ServerApp and ClientApp in one process (in_process_flower.py): the deployment's
own code for every message, with records and node state serialized as on the wire, and no
processes. What needs real processes (TLS, node authentication, a node or the ServerApp killed,
SCAFFOLD and LoRA bit for bit across real nodes) is in test_deployment.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import build_tiny_model_folder, make_conversations, make_records, make_tagged_sentences, read_metrics
from deployment_setup import (
    NAMES,
    NO_CLIENT_EVALUATION,
    config_writer,
    largest_difference,
    same_model,
    simulate,
    write_client_files,
)
from fedlm.config import load_config
from fedlm.errors import FedlmError
from fedlm.privacy.homomorphic import HomomorphicKeys
from in_process_flower import run_in_process

FAULTY_APP = Path(__file__).parent / "flower_apps" / "faulty_client_app.py"


@pytest.fixture(scope="module")
def client_files(tmp_path_factory) -> dict[str, Path]:
    return write_client_files(tmp_path_factory.mktemp("clients"))


@pytest.fixture
def write_config(tmp_path, tiny_model_dir, client_files):
    return config_writer(tmp_path, tiny_model_dir, client_files)


def nodes(client_files: dict[str, Path], **extra: dict) -> dict[str, dict]:
    """Each client's node config: its dataset, plus `extra[name]`."""
    return {name: {"dataset": str(client_files[name]), **extra.get(name, {})} for name in NAMES}


def deployed_and_simulated(config: Path, node_configs: dict[str, dict], tmp_path: Path) -> tuple[list, list]:
    """The round records of `config` run over the Flower apps with `node_configs` and of its
    simulation (into tmp_path / "simulated"), once every round after the first had all three
    nodes and the two final models are equal bit for bit."""
    run_in_process(config, node_configs)
    deployed = read_metrics(tmp_path / "config")
    assert all(record["clients"] == 3 and not record["dropped"] for record in deployed[1:])
    simulated = simulate(config, tmp_path / "simulated")
    assert same_model(tmp_path / "config", simulated)
    return deployed, read_metrics(simulated)


def test_stack_with_a_lower_rank_node_matches_simulation_bit_for_bit(write_config, client_files, tmp_path):
    # alpha trains a rank-2 adapter (its node config says so; the simulation gives client 0 rank 2),
    # the others rank 4; stack sends each node the folded base weights and an adapter of its rank
    config = write_config(
        peft={"method": "lora", "r": 4, "client_ranks": [2, 4, 4], "aggregation": "stack"},
        training={"learning_rate": 1e-2},
        federation=NO_CLIENT_EVALUATION,
    )
    deployed, simulated = deployed_and_simulated(config, nodes(client_files, alpha={"lora-rank": 2}), tmp_path)
    assert deployed[1]["lora_aggregation_error"]["overall"] < 1e-4  # exact
    sent = deployed[1]["client_bytes"]
    assert sent["alpha"]["down"] < sent["beta"]["down"] == sent["gamma"]["down"]  # a smaller adapter
    assert [r.get("train_loss") for r in deployed] == [r.get("train_loss") for r in simulated]


def test_distillation_with_two_architectures_matches_simulation_bit_for_bit(write_config, client_files, tmp_path):
    # beta runs a 4-layer model (its node config says so; the simulation gives client 1 the
    # second of client_models), alpha and gamma the 2-layer one; a 2-layer student
    four_layers = build_tiny_model_folder(tmp_path / "four", layers=4)
    public = tmp_path / "public.csv"
    public.write_text("text\n" + "\n".join(record["text"] for record in make_records(80, seed=7)) + "\n")
    two_layers = load_config(write_config()).model.name
    config = write_config(
        algorithm={
            "kind": "distillation", "learning_rate": 1e-2, "epochs": 2, "digest_epochs": 1,
            "public_data": {"dataset": str(public)}, "client_models": [two_layers, str(four_layers)],
        },
        training={"learning_rate": 3e-3},
    )  # fmt: skip
    deployed, simulated = deployed_and_simulated(
        config, nodes(client_files, beta={"model": str(four_layers)}), tmp_path
    )
    assert deployed[2]["bytes_up"] < 3 * (80 * 3 * 4 + 2_000)  # outputs on the public set, not weights
    for ours, theirs in zip(deployed, simulated):
        assert ours.get("student_loss") == theirs.get("student_loss")
        assert ours["client_test"] == theirs["client_test"]  # each client's own model, on its test split


def test_experts_on_different_labels_distil_over_flower_as_in_simulation(tiny_model_dir, tmp_path):
    # each node declares its labels when it joins; the server restricts each node's soft labels
    # to them from those declarations, exactly as the simulation does from the clients' data
    label_sets = {"alpha": ["business", "sport"], "beta": ["sport", "tech"], "gamma": ["business", "tech"]}
    files = {}
    for index, (name, labels) in enumerate(label_sets.items()):
        files[name] = tmp_path / f"{name}.csv"
        rows = make_records(40, seed=20 + index, labels=labels)
        files[name].write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    public = tmp_path / "public.csv"
    public.write_text("text\n" + "\n".join(record["text"] for record in make_records(60, seed=7)) + "\n")
    config = config_writer(tmp_path, tiny_model_dir, files)(
        algorithm={"kind": "distillation", "learning_rate": 3e-3, "epochs": 2, "soft_labels_cover": "own_labels",
                   "public_data": {"dataset": str(public)}},
        training={"learning_rate": 3e-3}, federation={"rounds": 2, **NO_CLIENT_EVALUATION},
    )  # fmt: skip
    deployed, simulated = deployed_and_simulated(config, nodes(files), tmp_path)
    assert [r.get("student_loss") for r in deployed] == [r.get("student_loss") for r in simulated]
    every_label = load_config(config).algorithm.model_copy(update={"soft_labels_cover": "all"})
    assert not same_model(
        tmp_path / "simulated", simulate(config, tmp_path / "all", algorithm=every_label)
    )  # the masks mattered


def test_secure_aggregation_over_flower_gives_the_plain_models_sum(write_config, client_files, tmp_path):
    # four exchanges per round as Flower messages, each client's secrets in its node's state; the
    # server only ever holds masked vectors and their sum, and the model matches plain FedAvg
    config = write_config(
        secure_aggregation={"clip_range": 1.0},
        training={"learning_rate": 1e-2},
        federation={"rounds": 1, **NO_CLIENT_EVALUATION},
    )
    run_in_process(config, nodes(client_files))
    deployed = read_metrics(tmp_path / "config")
    assert all(r["secure_aggregation"]["finished"] == 3 and not r["dropped"] for r in deployed[1:])
    plain = simulate(config, tmp_path / "plain", secure_aggregation=None)
    assert largest_difference(tmp_path / "config", plain) < 1e-6  # quantization steps of ~2e-9 a value


def test_homomorphic_aggregation_over_flower_gives_the_plain_models_sum(write_config, client_files, tmp_path):
    # every node holds the secret context, the server the public one: it adds ciphertexts and a
    # node decrypts the sum (a query.stage message); the model matches plain FedAvg
    keys = HomomorphicKeys().save(tmp_path / "keys")
    config = write_config(
        homomorphic={"public_context": str(keys["public"])},
        training={"learning_rate": 1e-2},
        federation={"rounds": 1, **NO_CLIENT_EVALUATION},
    )
    secret = {"he-secret-context": str(keys["secret"])}
    run_in_process(config, nodes(client_files, **{name: secret for name in NAMES}))
    deployed = read_metrics(tmp_path / "config")
    assert all(r["homomorphic"]["finished"] == 3 and not r["dropped"] for r in deployed[1:])
    # ciphertexts (~80 bytes a value) outweigh the float32 parameters sent down for training
    assert deployed[1]["bytes_up"] > 2 * deployed[1]["bytes_down"]
    plain = simulate(config, tmp_path / "plain", homomorphic=None)
    assert largest_difference(tmp_path / "config", plain) < 1e-5  # CKKS's approximation


def test_each_node_keeps_its_dp_sgd_spending_between_rounds(write_config, client_files, tmp_path):
    config = write_config(
        federation={"rounds": 2, **NO_CLIENT_EVALUATION},
        training={"dp_sgd": {"noise_multiplier": 1.0, "clip_norm": 1.0}},
    )
    run_in_process(config, nodes(client_files))
    first, second = read_metrics(tmp_path / "config")[1:3]
    for name in NAMES:  # a node that forgot its first round would report round 1's epsilon again
        assert second["client_dp_sgd_epsilon"][name] > 1.1 * first["client_dp_sgd_epsilon"][name]


def test_misbehaving_and_broken_nodes_are_dropped_and_named(write_config, client_files, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("faulty_client_app", FAULTY_APP)
    faulty = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faulty)
    config = write_config(federation={"rounds": 1, **NO_CLIENT_EVALUATION}, deployment={"num_clients": 7})
    malformed = tmp_path / "malformed.csv"
    malformed.write_text("body,stars\nfine food,5\n")  # no text or label column to find
    node_configs = nodes(client_files)
    del node_configs["gamma"]
    for name in ("sends-nan", "wrong-shape", "oversized"):
        node_configs[name] = {"dataset": str(client_files["gamma"]), "name": name}
    node_configs["missing"] = {"dataset": str(tmp_path / "nowhere" / "missing.csv")}
    node_configs["malformed"] = {"dataset": str(malformed)}
    run_in_process(config, node_configs, apps={name: faulty.app for name in node_configs})

    log = capsys.readouterr().err
    excluded = [line for line in log.splitlines() if "SuperNode excluded: node" in line]
    assert len(excluded) == 2, log
    assert any("missing.csv" in line for line in excluded) and any("malformed.csv" in line for line in excluded)
    record = read_metrics(tmp_path / "config")[1]
    assert record["clients"] == 2, log
    reasons = {item["client"]: item["reason"] for item in record["dropped"]}
    assert "NaN" in reasons["sends-nan"]
    assert "shape" in reasons["wrong-shape"]
    assert "exceeds the limit" in reasons["oversized"]
    assert "round 1: client sends-nan (node " in log


def test_too_few_nodes_fails_saying_how_many_were_seen(write_config, client_files):
    config = write_config(deployment={"num_clients": 3, "node_wait_timeout": 1})
    with pytest.raises(FedlmError, match="waited 1 s for 3 SuperNodes, saw 2 connected"):
        run_in_process(config, {name: node for name, node in nodes(client_files).items() if name != "gamma"})


def test_a_decoder_with_lora_over_flower_matches_simulation_bit_for_bit(tiny_llama_dir, tmp_path):
    chats = make_conversations(90, seed=1)
    files = {}
    for index, name in enumerate(NAMES):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(json.dumps(row) for row in chats[index::3]))
    config = config_writer(tmp_path, tiny_llama_dir, files)(
        task={"kind": "causal_lm"},
        peft={"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        training={"learning_rate": 1e-2, "max_length": 48},
    )
    deployed, simulated = deployed_and_simulated(config, nodes(files), tmp_path)
    assert {item["client"] for item in deployed[-1]["client_test"]} == set(NAMES)
    for ours, theirs in zip(deployed, simulated):
        assert ours.get("train_loss") == theirs.get("train_loss")
        assert ours["client_test"] == theirs["client_test"]  # each node's perplexity on its test split


def test_tagging_over_flower_matches_simulation_bit_for_bit(tiny_model_dir, tmp_path):
    """The nodes report their tags; the ServerApp joins them into the tag map it sends back. Each
    node also reports its main value of data.group_by (a desk: alpha holds a third of sports
    sentences, but mostly news), and rounds group the nodes' test results by it."""
    sentences = make_tagged_sentences(90, seed=2)
    files = {}
    for index, name in enumerate(NAMES):
        rows = [{**row, "desk": "sports" if index == 2 or row_number % 3 == 0 else "news"}
                for row_number, row in enumerate(sentences[index::3])]  # fmt: skip
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(json.dumps(row) for row in rows))
    config = config_writer(tmp_path, tiny_model_dir, files)(
        task={"kind": "token_classification"}, data={"group_by": "desk"},
        training={"learning_rate": 1e-2, "max_length": 32},
    )  # fmt: skip
    deployed, simulated = deployed_and_simulated(config, nodes(files), tmp_path)
    assert {item["client"] for item in deployed[-1]["client_test"]} == set(NAMES)
    assert all("f1" in item and "f1_PER" in item for item in deployed[-1]["client_test"])
    by_desk = deployed[-1]["client_test_by_desk"]
    assert {desk: group["clients"] for desk, group in by_desk.items()} == {"news": 2, "sports": 1}
    for ours, theirs in zip(deployed, simulated):
        assert ours["client_test"] == theirs["client_test"]  # each node's entity F1 on its test split
        assert ours["client_test_by_desk"] == theirs["client_test_by_desk"]


def test_distillation_of_decoders_over_flower_matches_simulation_bit_for_bit(tiny_llama_dir, tmp_path):
    chats = make_conversations(120, seed=3)
    files = {}
    for index, name in enumerate(NAMES):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(json.dumps(row) for row in chats[index:90:3]))
    public = tmp_path / "public.jsonl"
    public.write_text("\n".join(json.dumps(row) for row in chats[90:]))
    config = config_writer(tmp_path, tiny_llama_dir, files)(
        task={"kind": "causal_lm", "samples": 1, "max_new_tokens": 4},
        algorithm={"kind": "distillation", "public_data": {"dataset": str(public)}, "top_k": 4, "temperature": 1.0,
                   "learning_rate": 1e-2},
        training={"learning_rate": 1e-2, "max_length": 48},
    )  # fmt: skip
    deployed, simulated = deployed_and_simulated(config, nodes(files), tmp_path)
    for ours, theirs in zip(deployed, simulated):
        assert ours.get("student_loss") == theirs.get("student_loss")
        assert ours.get("sample") == theirs.get("sample")
