"""The command line, run as a user runs it."""

import json

import pytest
import yaml

from conftest import make_records, run_fedlm


def fedlm(*args, cwd):
    return run_fedlm(*args, cwd=cwd, timeout=300)


def test_fedlm_run_trains_and_saves(tmp_path, tiny_model_dir):
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps({"content": r["text"], "category": r["label"]}) for r in make_records(200, 5)))
    config = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"dataset": str(data), "partition": {"kind": "iid", "num_clients": 3}},
        "federation": {"rounds": 2},
        "training": {"local_epochs": 2, "learning_rate": 3e-3, "max_length": 32},
        "output_dir": "ignored",
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = fedlm("run", "run.yaml", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 2/2" in result.stdout and "val acc" in result.stdout and "up " in result.stdout
    assert "privacy: the server saw every client's update" in " ".join(result.stdout.split())
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and lines[-1]["clients_evaluated"] == 3 and "client_accuracy_p10" in lines[-1]
    assert "client acc mean" in result.stdout
    assert (tmp_path / "out" / "partition.json").exists() and (tmp_path / "out" / "partition.png").exists()


STRATEGY_PLUGIN = """
from pathlib import Path
from typing import Literal

from pydantic import Field

import fedlm
from fedlm.config import StrategyBase
from fedlm.core.strategies import FedAvg


class LoggedStep(FedAvg):
    def aggregate(self, global_params, updates):
        with Path(__file__).with_name("aggregated.txt").open("a") as log:
            log.write(f"{self.server_lr} {len(updates)}\\n")
        return super().aggregate(global_params, updates)


class LoggedStepConfig(StrategyBase):
    kind: Literal["logged_step"] = "logged_step"
    server_lr: float = Field(1.0, gt=0, le=1)


fedlm.register_strategy("logged_step", LoggedStep, LoggedStepConfig)
"""


def test_run_imports_the_plugins_its_config_lists_before_validating_it(tmp_path, tiny_model_dir):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "logged_step.py").write_text(STRATEGY_PLUGIN)
    data = tmp_path / "topics.csv"
    data.write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in make_records(120, 2)))
    config = {
        "plugins": ["plugins/logged_step.py"],  # relative to the working directory
        "model": {"name": str(tiny_model_dir)},
        "data": {"dataset": str(data), "partition": {"kind": "iid", "num_clients": 2}},
        "federation": {"rounds": 2},
        "strategy": {"kind": "logged_step", "server_lr": 0.5},
        "training": {"max_length": 32},
        "output_dir": "out",
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = fedlm("run", "run.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "plugins" / "aggregated.txt").read_text() == "0.5 2\n0.5 2\n"
    written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert written["plugins"] == ["plugins/logged_step.py"] and written["strategy"]["kind"] == "logged_step"

    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**config, "strategy": {"kind": "logged_step", "server_lr": 2}}))
    result = fedlm("run", "run.yaml", "--overwrite", cwd=tmp_path)
    assert result.returncode == 2
    assert "run.yaml: strategy.logged_step.server_lr: Input should be less than or equal to 1" in result.stderr
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**config, "plugins": ["plugins/missing.py"]}))
    result = fedlm("run", "run.yaml", "--overwrite", cwd=tmp_path)
    assert result.returncode == 2
    assert "plugins.0: Value error, plugin file plugins/missing.py does not exist" in result.stderr
    assert "strategy: Input tag 'logged_step'" in result.stderr  # without the plug-in, the kind is unknown


def test_bad_config_exits_2_and_names_the_field_on_stderr(tmp_path):
    (tmp_path / "run.yaml").write_text("federation: {rounds: -1}\n")
    result = fedlm("run", "run.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: run.yaml: federation.rounds") and result.stdout == ""
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_dataset_exits_2_and_names_the_file(tmp_path, tiny_model_dir):
    (tmp_path / "run.yaml").write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{dataset: nowhere.csv}}\n")
    result = fedlm("run", "run.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "nowhere.csv does not exist" in result.stderr


CRASHING_CLI = """
import sys
import fedlm.cli

def load_config(path):
    client_text = "patient 17 was diagnosed with"  # a local an unexpected error must not print
    raise RuntimeError("something broke")

fedlm.cli.load_config = load_config
sys.argv[0] = "fedlm"
fedlm.cli.app()
"""


def test_an_unexpected_error_is_one_line_on_stderr_and_exit_1_unless_debug(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "crash.py"
    script.write_text(CRASHING_CLI)
    result = subprocess.run([sys.executable, str(script), "run", "x.yaml"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        "error: internal error: RuntimeError: something broke (run with --debug for the traceback)\n"
    )
    result = subprocess.run(
        [sys.executable, str(script), "--debug", "run", "x.yaml"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "in load_config\n" in result.stderr
    assert result.stderr.rstrip().endswith("RuntimeError: something broke")
    assert "patient 17" not in result.stderr


def test_fedlm_partition_prints_the_table_and_writes_the_report(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in make_records(120, 1)))
    (tmp_path / "p.yaml").write_text(
        f"output_dir: out\ndata: {{dataset: {data}, partition: {{kind: dirichlet, alpha: 0.3, num_clients: 4, min_size: 5}}}}\n"
    )
    result = fedlm("partition", "p.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "client-0" in result.stdout and "top share" in result.stdout and "business" in result.stdout
    report = json.loads((tmp_path / "out" / "partition.json").read_text())
    assert report["num_clients"] == 4 and report["train_examples"] + report["test_examples"] == 96


def test_certs_writes_a_ca_a_server_certificate_it_signed_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_identity

    result = run_fedlm(
        "certs", str(tmp_path), "--host", "10.0.0.7", "--host", "link.example.org", "--node", "a", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org"]
    private = load_ssh_private_key((tmp_path / "a.key").read_bytes(), password=None)
    public = load_ssh_public_identity((tmp_path / "a.pub").read_bytes())
    assert private.public_key().public_numbers() == public.public_numbers()
    assert oct((tmp_path / "a.key").stat().st_mode & 0o777) == "0o600"


def test_he_keys_writes_a_secret_context_for_clients_and_a_public_one_for_the_server(config_data_factory, tmp_path):
    import tenseal

    result = fedlm("he-keys", "keys", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    secret, public = tmp_path / "keys" / "he-secret.ctx", tmp_path / "keys" / "he-public.ctx"
    assert secret.stat().st_mode & 0o777 == 0o600  # the secret key, readable by its owner only
    assert tenseal.context_from(secret.read_bytes()).is_private()
    assert not tenseal.context_from(public.read_bytes()).is_private()
    # the flower backend checks the server's context before any node is asked to train
    config = config_data_factory(num_clients=3, rounds=1, homomorphic={"public_context": str(secret)})
    (tmp_path / "he.yaml").write_text(yaml.safe_dump(config))
    result = fedlm("run", "he.yaml", "--backend", "flower", "--superlink", "127.0.0.1:9", "--insecure", cwd=tmp_path)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0 and "holds the secret key; the server must get he-public.ctx only" in output


def invoke(*args):
    from typer.testing import CliRunner

    from fedlm.cli import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def test_he_keys_never_replace_a_secret_without_force_and_write_it_owner_only(tmp_path):
    secret = tmp_path / "he-secret.ctx"
    secret.write_bytes(b"the old secret")
    secret.chmod(0o644)
    refused = invoke("he-keys", tmp_path)
    assert refused.exit_code == 2 and f"{secret}" in refused.stderr and "--force" in refused.stderr
    assert secret.read_bytes() == b"the old secret" and not (tmp_path / "he-public.ctx").exists()
    replaced = invoke("he-keys", tmp_path, "--force")
    assert replaced.exit_code == 0, replaced.output
    assert secret.read_bytes() != b"the old secret" and secret.stat().st_mode & 0o777 == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == ["he-public.ctx", "he-secret.ctx"]  # no temp files


def test_certs_never_replace_a_ca_key_without_force(tmp_path):
    assert invoke("certs", tmp_path).exit_code == 0
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    refused = invoke("certs", tmp_path, "--node", "a")
    assert refused.exit_code == 2 and str(tmp_path / "ca.key") in refused.stderr and "--force" in refused.stderr
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    (tmp_path / "ca.key").chmod(0o644)
    replaced = invoke("certs", tmp_path, "--force")
    assert replaced.exit_code == 0, replaced.output
    assert (tmp_path / "ca.key").read_bytes() != before["ca.key"]
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(before)


@pytest.mark.parametrize("name", ["../x", "..", "a/b", ".", "", "a b"])
def test_certs_refuse_node_names_that_are_not_plain_names(tmp_path, name):
    folder = tmp_path / "deep" / "certs"
    result = invoke("certs", folder, "--node", name)
    assert result.exit_code == 2 and "--node" in result.stderr and "letters, digits" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, inside the folder or out of it


def test_the_demo_replaces_its_own_earlier_run_only_with_overwrite(monkeypatch, tmp_path):
    import fedlm.cli

    runs = []
    monkeypatch.setattr(fedlm.cli, "_run", lambda config, overwrite=False: runs.append(overwrite))
    assert invoke("demo", "--output-dir", tmp_path / "demo").exit_code == 0
    assert invoke("demo", "--output-dir", tmp_path / "demo", "--overwrite").exit_code == 0
    assert runs == [False, True]
