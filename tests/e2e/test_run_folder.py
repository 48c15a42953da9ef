"""Run folders are fedlm's own: what a run may write into, how it writes, and how it ends."""

from __future__ import annotations

import json
import shutil
import tomllib

import pytest
import yaml
from typer.testing import CliRunner

import fedlm.cli
from conftest import read_metrics
from fedlm.client import FedClient
from fedlm.config import parse_config
from fedlm.errors import ConfigError
from fedlm.runtime import build_simulation, run_federation
from fedlm.runtime.rounds import round_line
from fedlm.server import FedServer
from fedlm.tasks import ClassificationTask


@pytest.fixture
def small_config(config_data_factory):
    """A 2-client, 1-round run over 80 examples: seconds, not minutes."""

    def make(**sections) -> dict:
        data = config_data_factory(num_clients=2, rounds=1, **sections)
        data["data"]["max_examples"] = 80
        data["training"]["local_epochs"] = 1
        return data

    return make


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """`fedlm run CONFIG OPTIONS...` in this process: (exit code, output)."""
    monkeypatch.setattr(fedlm.cli.console, "width", 1000)  # no wrapped paths

    def invoke(data: dict, *options: str) -> tuple[int, str]:
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(data))
        result = CliRunner().invoke(fedlm.cli.app, ["run", str(path), *options])
        assert "Traceback" not in result.output
        return result.exit_code, result.output

    return invoke


def snapshot(folder) -> dict:
    """Every file under `folder` and its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def strict_json(text: str):
    """Parse JSON as the standard defines it: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_fresh_run_refuses_a_checkpointed_folder_and_overwrite_starts_afresh(small_config, cli, tmp_path):
    data = small_config(training={"learning_rate": 1e-2})
    run_federation(build_simulation(parse_config(data)))
    run = tmp_path / "run"
    before = snapshot(run)

    changed = {**data, "training": {**data["training"], "learning_rate": 3e-3}}
    code, output = cli(changed)
    assert code == 2 and "holds a fedlm run with a checkpoint" in output
    assert "--resume" in output and "--overwrite" in output and str(run) in output
    with pytest.raises(ConfigError, match="pass --resume to continue it, --overwrite to start afresh"):
        run_federation(build_simulation(parse_config(changed)))
    assert snapshot(run) == before  # nothing written
    marker = json.loads((run / "fedlm-run.json").read_text())
    assert marker.keys() == {"fedlm_version", "created", "config_sha256"}

    (run / "notes.txt").write_text("the user's own file")
    (run / "checkpoint.old").mkdir()  # a leftover of fedlm's
    code, output = cli(changed, "--overwrite")
    assert code == 0, output
    assert (run / "notes.txt").read_text() == "the user's own file"  # --overwrite deletes fedlm's outputs only
    assert not (run / "checkpoint.old").exists()
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["config"]["training"]["learning_rate"] == 3e-3  # afresh: a resume would refuse the new config
    assert [record["round"] for record in read_metrics(run)] == [0, 1]


@pytest.mark.parametrize("output_is_the_model", [True, False], ids=["the-model-folder", "a-folder-of-notes"])
def test_a_folder_fedlm_did_not_make_is_refused_and_left_byte_for_byte(
    small_config, cli, tmp_path, tiny_model_dir, output_is_the_model
):
    folder = tmp_path / "bert"
    if output_is_the_model:
        shutil.copytree(tiny_model_dir, folder)
    else:
        folder.mkdir()
    (folder / "config.yaml").write_text("# hand-written\n")
    (folder / "metrics.jsonl").write_text("my own measurements\n")
    data = small_config(model={"name": str(folder) if output_is_the_model else str(tiny_model_dir)})
    data["output_dir"] = str(folder)
    before = snapshot(folder)
    for options in ([], ["--overwrite"]):
        code, output = cli(data, *options)
        assert code == 2, output
        if output_is_the_model:
            assert f"model.name {folder} is where this run would write its outputs" in output
        else:
            assert f"output_dir {folder} is not empty and is not a fedlm run folder" in output
            assert "choose a new or empty folder as output_dir" in output
        assert snapshot(folder) == before


def test_the_final_model_never_replaces_the_runs_input_model(small_config, cli, tmp_path, tiny_model_dir):
    # a run folder whose model/ a new config fine-tunes further, into the same folder
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "fedlm-run.json").write_text("{}")
    data = small_config(model={"name": str(run / "model")})
    before = snapshot(run)
    for options in ([], ["--overwrite"]):
        code, output = cli(data, *options)
        assert code == 2 and f"model.name {run / 'model'} is where this run would write its outputs" in output
        assert "choose another output_dir" in output
        assert snapshot(run) == before


def test_a_failed_metrics_write_leaves_the_previous_metrics_intact(small_config, tmp_path, monkeypatch):
    data = small_config()
    run_federation(build_simulation(parse_config(data)))
    metrics = tmp_path / "run" / "metrics.jsonl"
    before = metrics.read_bytes()
    dumps = json.dumps

    def disk_full_at_round_one(value, *args, **kwargs):
        if isinstance(value, dict) and value.get("round") == 1:
            raise OSError("no space left on device")
        return dumps(value, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", disk_full_at_round_one)  # every writer's JSON goes through json.dumps
    longer = parse_config({**data, "federation": {**data["federation"], "rounds": 2}})
    with pytest.raises(OSError, match="no space left"):
        run_federation(build_simulation(longer), resume=True)
    assert metrics.read_bytes() == before
    assert not (tmp_path / "run" / "metrics.jsonl.tmp").exists()


def test_a_failed_model_save_leaves_the_previous_model_intact(small_config, tmp_path, monkeypatch):
    data = small_config()
    run_federation(build_simulation(parse_config(data)))
    model = tmp_path / "run" / "model"
    before = snapshot(model)

    def crash_mid_save(server, path, merge_lora=True):
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors").write_bytes(b"half a model")
        raise OSError("no space left on device")

    monkeypatch.setattr(FedServer, "save", crash_mid_save)
    longer = parse_config({**data, "federation": {**data["federation"], "rounds": 2}})
    with pytest.raises(OSError, match="no space left"):
        run_federation(build_simulation(longer), resume=True)
    assert snapshot(model) == before


def test_a_run_in_which_no_round_aggregated_exits_2_and_says_so(small_config, cli, tmp_path, monkeypatch):
    def lose_power(client, ins):
        raise RuntimeError(f"{client.name} lost power")

    monkeypatch.setattr(FedClient, "fit", lose_power)
    code, output = cli(small_config())
    assert code == 2, output
    assert "no round aggregated" in output and "federation.min_clients (1)" in output
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["aggregated_rounds"] == 0 and summary["warning"].startswith("no round aggregated")
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    assert record["skipped"] and len(record["dropped"]) == 2
    assert not (run / "model").exists()  # nothing trained: no model that looks like one


def test_json_outputs_write_null_and_a_flag_never_bare_nan(small_config, tmp_path, monkeypatch):
    train = FedClient._train

    def nan_loss(client, *args, **kwargs):  # a reply may not carry NaN (the gate drops it): no loss reported
        result = train(client, *args, **kwargs)
        del result.metrics["loss"]
        return result

    monkeypatch.setattr(FedClient, "_train", nan_loss)
    lines = []
    run_federation(
        build_simulation(parse_config(small_config())),
        on_round_end=lambda r: lines.append(round_line(r, 1, ClassificationTask())),
    )
    run = tmp_path / "run"
    record = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1]
    assert record["train_loss"] is None and "train_loss" in record["non_finite"]
    strict_json((run / "summary.json").read_text())
    state = strict_json((run / "checkpoint" / "state.json").read_text())
    assert state["records"][1]["train_loss"] is None and state["history"][0]["train_loss"] is None
    assert "train loss non-finite" in lines[1]


def test_flower_checks_the_run_folder_before_reaching_the_superlink(small_config, tmp_path):
    from fedlm.runtime.flower.launch import launch_flower_run

    data = small_config()
    run_federation(build_simulation(parse_config(data)))
    with pytest.raises(ConfigError, match="holds a fedlm run with a checkpoint: pass --resume"):
        launch_flower_run(parse_config(data), "127.0.0.1:9", None, insecure=True)


def test_the_flower_server_app_gets_the_flags_and_checks_the_folder_before_waiting_for_nodes(small_config, tmp_path):
    from flwr.app import Context, RecordDict

    from fedlm.runtime.flower.launch import write_app
    from fedlm.runtime.flower.server_app import main

    data = small_config()
    app = write_app(tmp_path / "app", parse_config(data), resume=False, overwrite=True, allow_data_change=False)
    run_config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert run_config["overwrite"] is True and run_config["allow-data-change"] is False
    assert run_config["resume"] is False
    run_federation(build_simulation(parse_config(data)))
    # without --overwrite, the ServerApp refuses the checkpointed folder before it asks the grid anything
    context = Context(1, 0, {}, RecordDict(), {**run_config, "overwrite": False})
    with pytest.raises(ConfigError, match="holds a fedlm run with a checkpoint"):
        main(None, context)
