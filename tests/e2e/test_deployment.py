"""Flower deployment end to end on 127.0.0.1: a real SuperLink and SuperNodes (TLS, node
authentication), `fedlm run --backend flower`, and the faults a federation must survive."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import build_tiny_model_folder, make_records, read_metrics
from fedlm.config import load_config
from fedlm.privacy.homomorphic import HomomorphicKeys
from fedlm.runtime import build_simulation, run_federation
from fedlm.runtime.flower.certs import make_certificates
from fedlm.runtime.flower.flower_app import write_flower_app
from fedlm.runtime.flower.local_deployment import LocalDeployment

NAMES = ["alpha", "beta", "gamma"]
# every message to a node is a fresh ClientApp process that imports torch and transformers and
# loads the model (BENCHMARKS.md): a test that asserts nothing of the clients' test metrics
# skips their evaluation, a third to a half of its processes
NO_CLIENT_EVALUATION = {"clients_per_evaluation": 0}
APPS = Path(__file__).parent / "flower_apps"


@pytest.fixture
def client_files(tmp_path) -> dict[str, Path]:
    files = {}
    for index, name in enumerate(NAMES):
        files[name] = tmp_path / "data" / f"{name}.csv"
        files[name].parent.mkdir(exist_ok=True)
        with files[name].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["text", "label"])
            writer.writeheader()
            writer.writerows(make_records(60, seed=index))
    return files


@pytest.fixture
def write_config(tmp_path, tiny_model_dir, client_files):
    """Write a run config over the client files (a predefined partition, so that a simulation of
    the same config holds exactly the SuperNodes' data); `sections` override its sections."""

    def write(name: str = "config", **sections) -> Path:
        config = {
            "seed": 3,
            "output_dir": str(tmp_path / name),
            "model": {"name": str(tiny_model_dir)},
            "data": {
                "validation_fraction": 0.0,
                "client_test_fraction": 0.2,
                "partition": {"kind": "predefined", "clients": [str(path) for path in client_files.values()]},
            },
            "federation": {"rounds": 2, "round_timeout": 60},
            "training": {"batch_size": 8, "learning_rate": 1e-3, "max_length": 32, "threads": 1},
        }
        for section, values in sections.items():
            config[section] = {**config.get(section, {}), **values}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.fixture
def deployment(tmp_path):
    with LocalDeployment(tmp_path / "deployment") as local:
        yield local
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "deployment")], capture_output=True, text=True)
    assert not leftovers.stdout.strip(), f"processes left running: {leftovers.stdout}"


def start_nodes(deployment: LocalDeployment, files: dict[str, Path]) -> None:
    for name, path in files.items():
        deployment.start_node(name, {"dataset": str(path)})


def simulate(config_path: Path, output_dir: Path) -> Path:
    config = load_config(config_path)
    run_federation(build_simulation(config.model_copy(update={"output_dir": output_dir})))
    return output_dir


def same_model(first: Path, second: Path) -> bool:
    a, b = load_file(first / "model" / "model.safetensors"), load_file(second / "model" / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)


def test_deployment_matches_simulation_bit_for_bit(deployment, write_config, client_files, tmp_path):
    # SCAFFOLD: the clients' control variates must persist on the nodes between rounds; LoRA: every
    # node must build the same seeded adapter as the server
    config = write_config(
        strategy={"kind": "scaffold"},
        training={"optimizer": "sgd", "learning_rate": 0.05},
        peft={"method": "lora", "r": 4},
    )
    start_nodes(deployment, client_files)
    result = deployment.run(config)
    assert result.returncode == 0, result.stdout + result.stderr
    deployed = read_metrics(tmp_path / "config")
    assert [record["round"] for record in deployed] == [0, 1, 2]
    assert all(record["clients"] == 3 and not record["dropped"] for record in deployed[1:])
    assert deployed[2]["bytes_up"] > 2 * deployed[2]["bytes_down"] / 3  # update plus control delta, per client

    simulated = simulate(config, tmp_path / "simulated")
    assert same_model(tmp_path / "config", simulated)
    for ours, theirs in zip(deployed, read_metrics(simulated)):
        assert ours.get("train_loss") == theirs.get("train_loss")
        assert ours["client_test"] == theirs["client_test"]


def test_stack_with_a_lower_rank_node_matches_simulation_bit_for_bit(deployment, write_config, client_files, tmp_path):
    # alpha trains a rank-2 adapter (its node config says so; the simulation gives client 0 rank 2),
    # the others rank 4; stack sends each node the folded base weights and an adapter of its rank
    config = write_config(
        peft={"method": "lora", "r": 4, "client_ranks": [2, 4, 4], "aggregation": "stack"},
        training={"learning_rate": 1e-2},
        federation=NO_CLIENT_EVALUATION,
    )
    deployment.start_node("alpha", {"dataset": str(client_files["alpha"]), "lora-rank": 2})
    start_nodes(deployment, {name: client_files[name] for name in ("beta", "gamma")})
    result = deployment.run(config)
    assert result.returncode == 0, result.stdout + result.stderr
    deployed = read_metrics(tmp_path / "config")
    assert all(record["clients"] == 3 and not record["dropped"] for record in deployed[1:])
    assert deployed[1]["lora_aggregation_error"]["overall"] < 1e-4  # exact
    sent = deployed[1]["client_bytes"]
    assert sent["alpha"]["down"] < sent["beta"]["down"] == sent["gamma"]["down"]  # a smaller adapter
    simulated = simulate(config, tmp_path / "simulated")
    assert same_model(tmp_path / "config", simulated)
    assert [r.get("train_loss") for r in deployed] == [r.get("train_loss") for r in read_metrics(simulated)]


def test_distillation_with_two_architectures_matches_simulation_bit_for_bit(
    deployment, write_config, client_files, tmp_path
):
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
    start_nodes(deployment, {name: client_files[name] for name in ("alpha", "gamma")})
    deployment.start_node("beta", {"dataset": str(client_files["beta"]), "model": str(four_layers)})
    result = deployment.run(config)
    assert result.returncode == 0, result.stdout + result.stderr
    deployed = read_metrics(tmp_path / "config")
    assert all(record["clients"] == 3 and not record["dropped"] for record in deployed[1:])
    assert deployed[2]["bytes_up"] < 3 * (80 * 3 * 4 + 2_000)  # outputs on the public set, not weights
    simulated = simulate(config, tmp_path / "simulated")
    assert same_model(tmp_path / "config", simulated)
    for ours, theirs in zip(deployed, read_metrics(simulated)):
        assert ours.get("student_loss") == theirs.get("student_loss")
        assert ours["client_test"] == theirs["client_test"]  # each client's own model, on its test split


def test_secure_aggregation_over_flower_gives_the_plain_models_sum(deployment, write_config, client_files, tmp_path):
    # four exchanges per round as Flower messages, each client's secrets in its node's state; the
    # server only ever holds masked vectors and their sum, and the model matches plain FedAvg
    config = write_config(
        secure_aggregation={"clip_range": 1.0},
        training={"learning_rate": 1e-2},
        # four messages per client in a round, each a fresh ClientApp process that imports fedlm and loads the
        # model anew (~10 s each on a busy 2-core machine): one minute for all of them is too tight
        federation={"rounds": 1, "round_timeout": 240, **NO_CLIENT_EVALUATION},
    )
    start_nodes(deployment, client_files)
    result = deployment.run(config)
    assert result.returncode == 0, result.stdout + result.stderr
    deployed = read_metrics(tmp_path / "config")
    assert all(r["secure_aggregation"]["finished"] == 3 and not r["dropped"] for r in deployed[1:])
    plain = load_config(config).model_copy(update={"secure_aggregation": None, "output_dir": tmp_path / "plain"})
    run_federation(build_simulation(plain))
    a, b = (
        load_file(tmp_path / "config" / "model" / "model.safetensors"),
        load_file(tmp_path / "plain" / "model" / "model.safetensors"),
    )
    # quantization steps of ~2e-9 per value and float32 sums
    assert max(float((a[key] - b[key]).abs().max()) for key in a) < 1e-6


def test_homomorphic_aggregation_over_flower_gives_the_plain_models_sum(
    deployment, write_config, client_files, tmp_path
):
    # every node holds the secret context, the server the public one: it adds ciphertexts and a
    # node decrypts the sum (a query.stage message); the model matches plain FedAvg
    keys = HomomorphicKeys().save(tmp_path / "keys")
    config = write_config(
        homomorphic={"public_context": str(keys["public"])},
        training={"learning_rate": 1e-2},
        federation={"rounds": 1, **NO_CLIENT_EVALUATION},
    )
    for name, path in client_files.items():
        deployment.start_node(name, {"dataset": str(path), "he-secret-context": str(keys["secret"])})
    result = deployment.run(config)
    assert result.returncode == 0, result.stdout + result.stderr
    deployed = read_metrics(tmp_path / "config")
    assert all(r["homomorphic"]["finished"] == 3 and not r["dropped"] for r in deployed[1:])
    # ciphertexts (~80 bytes a value) outweigh the float32 parameters sent down for training
    assert deployed[1]["bytes_up"] > 2 * deployed[1]["bytes_down"]
    plain = load_config(config).model_copy(update={"homomorphic": None, "output_dir": tmp_path / "plain"})
    run_federation(build_simulation(plain))
    a, b = (
        load_file(tmp_path / "config" / "model" / "model.safetensors"),
        load_file(tmp_path / "plain" / "model" / "model.safetensors"),
    )
    assert max(float((a[key] - b[key]).abs().max()) for key in a) < 1e-5  # CKKS's approximation


def test_a_node_killed_in_round_two_is_dropped_and_the_round_completes(
    deployment, write_config, client_files, tmp_path
):
    # the clients also train with DP-SGD: each node keeps its privacy spending in its node state
    dp_sgd = {"noise_multiplier": 1.0, "clip_norm": 1.0}
    config = write_config(
        federation={"rounds": 2, "round_timeout": 40, "min_clients": 2, **NO_CLIENT_EVALUATION},
        training={"dp_sgd": dp_sgd},
    )
    start_nodes(deployment, client_files)
    run = subprocess.Popen(deployment.run_command(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "config" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 300, "round 1")
    deployment.kill("gamma")
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output
    first, second = read_metrics(tmp_path / "config")[1:3]
    assert second["clients"] == 2 and "train_loss" in second and not second.get("skipped")
    assert [item["client"] for item in second["dropped"]] == ["gamma"]
    for name in ("alpha", "beta"):  # a node that forgot its first round would report round 1's epsilon again
        assert second["client_dp_sgd_epsilon"][name] > 1.1 * first["client_dp_sgd_epsilon"][name]
    assert "round 2: client gamma (node " in output and "dropped" in output
    assert (tmp_path / "config" / "model" / "model.safetensors").exists()


def test_misbehaving_and_broken_nodes_are_dropped_and_named(deployment, write_config, client_files, tmp_path):
    config_path = write_config(
        federation={"rounds": 1, "round_timeout": 120, **NO_CLIENT_EVALUATION}, deployment={"num_clients": 7}
    )
    app = write_flower_app(tmp_path / "faulty-app", load_config(config_path), resume=False)
    shutil.copy(APPS / "faulty_client_app.py", app)
    pyproject = (app / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        pyproject.replace('"fedlm.runtime.flower.client_app:app"', '"faulty_client_app:app"')
    )
    start_nodes(deployment, {name: client_files[name] for name in ("alpha", "beta")})
    for name in ("sends-nan", "wrong-shape", "oversized"):
        deployment.start_node(name, {"dataset": str(client_files["gamma"]), "name": name})
    deployment.start_node("missing", {"dataset": str(tmp_path / "nowhere" / "missing.csv")})
    malformed = tmp_path / "malformed.csv"
    malformed.write_text("body,stars\nfine food,5\n")  # no text or label column to find
    deployment.start_node("malformed", {"dataset": str(malformed)})

    # the query and the round's fit are each 5 ClientApp processes that import torch and transformers
    result = deployment.flwr("run", str(app), "local", "--stream", timeout=300)
    log = result.stdout + result.stderr
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


def test_too_few_nodes_fails_saying_how_many_were_seen(deployment, write_config, client_files):
    config = write_config(deployment={"num_clients": 3, "node_wait_timeout": 5})
    start_nodes(deployment, {name: client_files[name] for name in ("alpha", "beta")})
    result = deployment.run(config)
    assert result.returncode != 0
    assert "waited 5 s for 3 SuperNodes, saw 2 connected" in " ".join((result.stdout + result.stderr).split())


def test_an_unregistered_supernode_is_refused(deployment, client_files):
    node = deployment.start_node("intruder", {"dataset": str(client_files["alpha"])}, register=False)
    assert node.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in deployment.log("intruder")


def test_mismatched_certificates_fail_clearly(deployment, write_config, client_files, tmp_path):
    other = make_certificates(tmp_path / "other-ca", ["127.0.0.1"])
    node = deployment.start_node("alpha", {"dataset": str(client_files["alpha"])}, root_certificates=other["ca.crt"])
    assert node.wait(timeout=60) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("alpha")

    command = deployment.run_command(write_config())
    command[command.index("--root-certificates") + 1] = str(other["ca.crt"])
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    message = " ".join((result.stdout + result.stderr).split())  # the console wraps long lines
    assert f"{other['ca.crt']} does not verify" in message and "as --root-certificates" in message


def test_server_killed_between_rounds_resumes_from_its_checkpoint(deployment, write_config, client_files, tmp_path):
    config = write_config(federation={"rounds": 2, "round_timeout": 120, **NO_CLIENT_EVALUATION})
    start_nodes(deployment, client_files)
    run = subprocess.Popen(deployment.run_command(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = tmp_path / "config" / "checkpoint" / "state.json"
    wait_for(lambda: state.exists() and json.loads(state.read_text())["round"] >= 1, 300, "the round 1 checkpoint")
    for pid in deployment.stragglers("flwr-serverapp"):  # the ServerApp's process: the server side
        os.kill(pid, signal.SIGKILL)
    run.kill()
    run.wait()
    assert json.loads(state.read_text())["round"] == 1

    result = deployment.run(config, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [record["round"] for record in read_metrics(tmp_path / "config")] == [0, 1, 2]
    assert same_model(tmp_path / "config", simulate(config, tmp_path / "simulated"))


@pytest.mark.real_model
def test_a_22m_parameter_model_goes_through_in_both_directions(deployment, write_config, client_files, tmp_path):
    config = write_config(
        model={"name": "minilm"},
        federation={"rounds": 1, "round_timeout": 300, "clients_per_evaluation": 0},
        training={"max_length": 16},
        deployment={"num_clients": 2},
    )
    start_nodes(deployment, {name: client_files[name] for name in ("alpha", "beta")})
    result = deployment.run(config)
    assert result.returncode == 0, result.stdout + result.stderr
    record = read_metrics(tmp_path / "config")[1]
    megabytes = 4 * 22_700_000 / 1e6
    assert record["clients"] == 2 and not record["dropped"]
    assert record["bytes_down"] / 2 / 1e6 > megabytes and record["bytes_up"] / 2 / 1e6 > megabytes
