"""Flower deployment end to end on 127.0.0.1: a real SuperLink and SuperNodes (TLS, node
authentication), `fedlm run --backend flower`, and the faults only real processes can show.

Most of the Flower apps' behaviour (stack, distillation, secure and homomorphic aggregation,
node state between rounds, misbehaving nodes) is tested in-process in test_flower_apps.py: the
same ServerApp and ClientApp code, without a ClientApp process per message. Here the tests share
one SuperLink and two SuperNodes, alpha and beta: every message to a node is a ClientApp process
that imports torch and transformers (BENCHMARKS.md), so a third node would add a third of the
cost and nothing these tests assert. The last test kills beta."""

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
    files = write_client_files(tmp_path_factory.mktemp("data"))
    return {name: files[name] for name in ("alpha", "beta")}


@pytest.fixture
def write_config(tmp_path, tiny_model_dir, client_files):
    return config_writer(tmp_path, tiny_model_dir, client_files)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, client_files):
    """One SuperLink and the SuperNodes alpha and beta, shared by the module's tests: each
    `fedlm run` is a run of its own on them."""
    folder = tmp_path_factory.mktemp("deployment")
    with LocalDeployment(folder) as local:
        start_nodes(local, client_files)
        yield local
    no_processes_left(folder)


def test_deployment_matches_simulation_bit_for_bit(deployment, write_config, tmp_path):
    # SCAFFOLD: the clients' control variates must persist on the nodes between rounds; LoRA: every
    # node must build the same seeded adapter as the server. The nodes' evaluation replies are the
    # same messages as their training replies; test_flower_apps.py compares them with the simulation.
    config = write_config(
        strategy={"kind": "scaffold"},
        training={"optimizer": "sgd", "learning_rate": 0.05},
        peft={"method": "lora", "r": 4},
        federation=NO_CLIENT_EVALUATION,
    )
    result = deployment.run(config)
    assert result.returncode == 0, result.stdout + result.stderr
    deployed = read_metrics(tmp_path / "config")
    assert [record["round"] for record in deployed] == [0, 1, 2]
    assert all(record["clients"] == 2 and not record["dropped"] for record in deployed[1:])
    assert deployed[2]["bytes_up"] > 2 * deployed[2]["bytes_down"] / 3  # update plus control delta, per client

    simulated = simulate(config, tmp_path / "simulated")
    assert same_model(tmp_path / "config", simulated)
    assert [record.get("train_loss") for record in deployed] == [
        record.get("train_loss") for record in read_metrics(simulated)
    ]


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


# last: it kills the node beta
@pytest.mark.real_model
def test_a_node_killed_mid_round_of_the_22m_parameter_model_is_dropped_and_the_round_completes(
    deployment, write_config, tmp_path
):
    # the round waits out its timeout for beta; alpha alone has the 22.7M parameters to receive,
    # train and send back before it, in about a third of it
    config = write_config(
        model={"name": "minilm"},
        federation={"rounds": 1, "round_timeout": 75, "min_clients": 1, **NO_CLIENT_EVALUATION},
        training={"max_length": 16},
    )
    run = subprocess.Popen(deployment.run_command(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "config" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 300, "the round 0 record")
    deployment.kill("beta")
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output
    record = read_metrics(tmp_path / "config")[1]
    assert record["clients"] == 1 and "train_loss" in record and not record.get("skipped")
    assert [item["client"] for item in record["dropped"]] == ["beta"]
    assert "round 1: client beta (node " in output and "dropped" in output
    megabytes = 4 * 22_700_000 / 1e6
    alpha = record["client_bytes"]["alpha"]
    assert alpha["down"] / 1e6 > megabytes and alpha["up"] / 1e6 > megabytes
    assert (tmp_path / "config" / "model" / "model.safetensors").exists()
