"""Flower deployment end to end on 127.0.0.1: a real SuperLink and SuperNodes (TLS, node
authentication), `fedlm run --backend flower`, and the faults only real processes can show.

Most of the Flower apps' behaviour (stack, distillation, secure and homomorphic aggregation,
node state between rounds, misbehaving nodes) is tested in-process in test_flower_apps.py: the
same ServerApp and ClientApp code, without a ClientApp process per message. Here the tests share
one SuperLink and three SuperNodes per module where they can; the one that kills a node has its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import read_metrics
from deployment_setup import NO_CLIENT_EVALUATION, config_writer, same_model, simulate, write_client_files
from fedlm.runtime.flower.certs import make_certificates
from fedlm.runtime.flower.local_deployment import LocalDeployment


def start_nodes(deployment: LocalDeployment, files: dict[str, Path]) -> None:
    for name, path in files.items():
        deployment.start_node(name, {"dataset": str(path)})


def no_processes_left(folder: Path) -> None:
    leftovers = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
    assert not leftovers.stdout.strip(), f"processes left running: {leftovers.stdout}"


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def client_files(tmp_path_factory) -> dict[str, Path]:
    return write_client_files(tmp_path_factory.mktemp("data"))


@pytest.fixture
def write_config(tmp_path, tiny_model_dir, client_files):
    return config_writer(tmp_path, tiny_model_dir, client_files)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, client_files):
    """One SuperLink and the SuperNodes alpha, beta and gamma, shared by the module's tests: each
    `fedlm run` is a run of its own on them."""
    folder = tmp_path_factory.mktemp("deployment")
    with LocalDeployment(folder) as local:
        start_nodes(local, client_files)
        yield local
    no_processes_left(folder)


def test_deployment_matches_simulation_bit_for_bit(deployment, write_config, tmp_path):
    # SCAFFOLD: the clients' control variates must persist on the nodes between rounds; LoRA: every
    # node must build the same seeded adapter as the server
    config = write_config(
        strategy={"kind": "scaffold"},
        training={"optimizer": "sgd", "learning_rate": 0.05},
        peft={"method": "lora", "r": 4},
    )
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


def test_an_unregistered_supernode_is_refused(deployment, client_files):
    node = deployment.start_node("intruder", {"dataset": str(client_files["alpha"])}, register=False)
    assert node.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in deployment.log("intruder")


def test_mismatched_certificates_fail_clearly(deployment, write_config, client_files, tmp_path):
    other = make_certificates(tmp_path / "other-ca", ["127.0.0.1"])
    node = deployment.start_node("other-ca", {"dataset": str(client_files["alpha"])}, root_certificates=other["ca.crt"])
    assert node.wait(timeout=60) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("other-ca")

    command = deployment.run_command(write_config())
    command[command.index("--root-certificates") + 1] = str(other["ca.crt"])
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    message = " ".join((result.stdout + result.stderr).split())  # the console wraps long lines
    assert f"{other['ca.crt']} does not verify" in message and "as --root-certificates" in message


@pytest.mark.real_model
def test_a_22m_parameter_model_goes_through_in_both_directions(deployment, write_config, tmp_path):
    config = write_config(
        model={"name": "minilm"},
        federation={"rounds": 1, "round_timeout": 300, "clients_per_round": 2, **NO_CLIENT_EVALUATION},
        training={"max_length": 16},
    )
    result = deployment.run(config)
    assert result.returncode == 0, result.stdout + result.stderr
    record = read_metrics(tmp_path / "config")[1]
    megabytes = 4 * 22_700_000 / 1e6
    assert record["clients"] == 2 and not record["dropped"]
    assert record["bytes_down"] / 2 / 1e6 > megabytes and record["bytes_up"] / 2 / 1e6 > megabytes


# last of the tests on the shared deployment: it kills the ServerApp's process under the SuperLink
def test_server_killed_between_rounds_resumes_from_its_checkpoint(deployment, write_config, tmp_path):
    config = write_config(federation={"rounds": 2, "round_timeout": 120, **NO_CLIENT_EVALUATION})
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


def test_a_killed_node_is_dropped_and_the_round_completes(write_config, client_files, tmp_path):
    config = write_config(federation={"rounds": 1, "round_timeout": 40, "min_clients": 2, **NO_CLIENT_EVALUATION})
    with LocalDeployment(tmp_path / "deployment") as deployment:
        start_nodes(deployment, client_files)
        command = deployment.run_command(config)
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        metrics = tmp_path / "config" / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 300, "the round 0 record")
        deployment.kill("gamma")
        output, _ = run.communicate(timeout=600)
    no_processes_left(tmp_path / "deployment")
    assert run.returncode == 0, output
    record = read_metrics(tmp_path / "config")[1]
    assert record["clients"] == 2 and "train_loss" in record and not record.get("skipped")
    assert [item["client"] for item in record["dropped"]] == ["gamma"]
    assert "round 1: client gamma (node " in output and "dropped" in output
    assert (tmp_path / "config" / "model" / "model.safetensors").exists()
