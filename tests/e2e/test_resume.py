"""Exact checkpoint and resume: 6 rounds equal 3 rounds + kill + resume, bit for bit; and what a resume checks."""

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file, save_file

from conftest import make_conversations, make_records
from fedlm.config import parse_config
from fedlm.errors import ConfigError
from fedlm.runtime import build_simulation, run_federation


def start_run(folder, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "fedlm", "run", "run.yaml", "--output-dir", "out", *extra],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def checkpoint_round(folder):
    try:
        return json.loads((folder / "out" / "checkpoint" / "state.json").read_text())["round"]
    except (OSError, ValueError):
        return -1


def decoder_config(data, tiny_llama_dir, folder):
    """`data` turned into dialogue tuning of the tiny Llama with LoRA, packing, a cosine learning
    rate and samples."""
    chats = folder / "chats.jsonl"
    chats.write_text("\n".join(json.dumps(row) for row in make_conversations(160, seed=1)))
    data["model"]["name"], data["data"]["dataset"] = str(tiny_llama_dir), str(chats)
    data["task"] = {"kind": "causal_lm", "packing": True, "samples": 2, "max_new_tokens": 8}
    data["peft"] = {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    data["training"].update(lr_schedule="cosine", max_length=64)
    return data


@pytest.mark.parametrize("strategy", [{"kind": "fedadam", "server_lr": 0.01}, {"kind": "scaffold"}])
def test_killed_run_resumes_bit_for_bit(tmp_path, config_data_factory, tiny_llama_dir, strategy):
    """FedAdam's moments on a decoder's LoRA adapters (packing, a cosine learning rate and samples),
    SCAFFOLD's control variates on the classifier."""
    data = config_data_factory(num_clients=4, rounds=6, strategy=strategy, federation={"clients_per_round": 3})
    if strategy["kind"] == "scaffold":
        data["training"]["optimizer"] = "sgd"
    else:
        data = decoder_config(data, tiny_llama_dir, tmp_path)
    data["training"].update(local_epochs=1, threads=1)  # one thread here and in the killed run's process
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_federation(build_simulation(parse_config({**data, "output_dir": str(straight / "out")})))
    interrupted.mkdir()
    (interrupted / "run.yaml").write_text(yaml.safe_dump(data))

    process = start_run(interrupted)
    deadline = time.time() + 300
    while checkpoint_round(interrupted) < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = checkpoint_round(interrupted)
    assert 3 <= killed_at < 6, f"the run was not killed between rounds (checkpoint at round {killed_at})"

    resumed = start_run(interrupted, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    final = [
        load_file(folder / "out" / "checkpoint" / "global.safetensors")["parameters"]
        for folder in (straight, interrupted)
    ]
    assert final[0].equal(final[1])
    metrics = [(folder / "out" / "metrics.jsonl").read_text().splitlines() for folder in (straight, interrupted)]
    assert [json.loads(line)["round"] for line in metrics[1]] == list(range(7))

    # The parameters are bit-identical (above), and so are the metrics, except timings and bytes up
    # (total and per client), whose reply headers carry the timings as JSON text (a longer number,
    # 8 more bytes).
    def comparable(line):
        record = {k: v for k, v in json.loads(line).items() if "seconds" not in k and k != "bytes_up"}
        if "client_bytes" in record:
            record["client_bytes"] = {name: counts["down"] for name, counts in record["client_bytes"].items()}
        return record

    for straight_line, resumed_line in zip(metrics[0], metrics[1], strict=True):
        expected, actual = comparable(straight_line), comparable(resumed_line)
        assert_close(actual, expected, f"round {expected['round']}")
    if "task" in data:
        samples = [(folder / "out" / "samples" / "round_6.jsonl").read_text() for folder in (straight, interrupted)]
        assert samples[0] == samples[1]


def assert_close(actual, expected, where):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


def test_resume_refuses_a_missing_corrupt_or_foreign_checkpoint(config_data_factory, tmp_path):
    data = config_data_factory(num_clients=2, rounds=1)
    with pytest.raises(ConfigError, match="cannot resume: no checkpoint in .*checkpoint"):
        run_federation(build_simulation(parse_config(data)), resume=True)
    run_federation(build_simulation(parse_config(data)))

    changed = {**data, "training": {**data["training"], "learning_rate": 1e-2}}
    with pytest.raises(ConfigError, match=r"different config \(training.learning_rate: 0.003 then, 0.01 now\)"):
        run_federation(build_simulation(parse_config(changed)), resume=True)

    longer = {**data, "federation": {**data["federation"], "rounds": 2}}
    history = run_federation(build_simulation(parse_config(longer)), resume=True)
    assert [record["round"] for record in history] == [1, 2]

    (tmp_path / "run" / "checkpoint" / "global.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="checkpoint .* is corrupt"):
        run_federation(build_simulation(parse_config(data)), resume=True)


# ---- what a resume checks --------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_model_dir):
    """A finished 1-round run (config dict, folder), made once; tests resume copies of it."""
    base = tmp_path_factory.mktemp("checkpointed")
    with (base / "topics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_records(80, seed=0))
    data = {
        "seed": 3,
        "output_dir": str(base / "run"),
        "model": {"name": str(tiny_model_dir)},
        "data": {"dataset": str(base / "topics.csv"), "partition": {"kind": "iid", "num_clients": 2}},
        "federation": {"rounds": 1},
        "training": {"local_epochs": 1, "learning_rate": 3e-3, "max_length": 32},
    }
    run_federation(build_simulation(parse_config(data)))
    return data, base / "run"


def resume_copy(checkpointed, tmp_path):
    """Copy the checkpointed run to tmp_path/run: (config of the copy, its checkpoint folder)."""
    data, run = checkpointed
    shutil.copytree(run, tmp_path / "run")
    return parse_config({**data, "output_dir": str(tmp_path / "run")}), tmp_path / "run" / "checkpoint"


def test_resume_refuses_a_bit_flipped_checkpoint_file(checkpointed, tmp_path):
    config, checkpoint = resume_copy(checkpointed, tmp_path)
    path = checkpoint / "global.safetensors"
    contents = bytearray(path.read_bytes())
    contents[-3] ^= 0x04  # a parameter's bit: the file still loads
    path.write_bytes(bytes(contents))
    with pytest.raises(ConfigError, match="is corrupt: global.safetensors does not match its sha256 in state.json"):
        run_federation(build_simulation(config), resume=True)


def test_resume_refuses_non_finite_parameters(checkpointed, tmp_path):
    config, checkpoint = resume_copy(checkpointed, tmp_path)
    path = checkpoint / "global.safetensors"
    state = load_file(path)
    state["parameters"][7] = float("nan")  # a run that diverged, checkpointed faithfully
    save_file(state, path)
    saved = json.loads((checkpoint / "state.json").read_text())
    saved.setdefault("files", {})["global.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (checkpoint / "state.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"global.safetensors 'parameters' holds 1 NaN or infinite value"):
        run_federation(build_simulation(config), resume=True)


def without(key):
    return lambda state: {name: value for name, value in state.items() if name != key}


def setting(key, value):
    return lambda state: {**state, key: value}


MALFORMED_STATES = {
    "not-json": ("{'round': 1", "is not JSON"),
    "a-list": ("[1, 2]", "holds a JSON list, not an object"),
    "no-config": (without("config"), "has no 'config'"),
    "no-records": (without("records"), "has no 'records'"),
    "no-round": (without("round"), "has no 'round'"),
    "round-a-string": (setting("round", "1"), "'round' must be an integer, got str"),
    "round-negative": (setting("round", -1), "'round' must be an integer >= 0"),
    "config-a-list": (setting("config", []), "'config' must be an object, got list"),
    "records-an-object": (setting("records", {}), "'records' must be a list, got dict"),
    "records-of-numbers": (setting("records", [1]), "'records' must be a list of objects, each with an integer"),
    "clients-of-numbers": (setting("clients", [1, 2]), "'clients' must be a list of client names"),
    "no-files": (without("files"), "has no 'files'"),
}


@pytest.mark.parametrize("case", MALFORMED_STATES, ids=list(MALFORMED_STATES))
def test_resume_refuses_a_malformed_state_json_saying_what_is_wrong(checkpointed, tmp_path, case):
    config, checkpoint = resume_copy(checkpointed, tmp_path)
    change, message = MALFORMED_STATES[case]
    path = checkpoint / "state.json"
    path.write_text(change if isinstance(change, str) else json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        run_federation(build_simulation(config), resume=True)
    assert str(path) in str(raised.value)


def edit_rows(path, edit):
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(edit(rows))


DATA_EDITS = {
    "rows-reordered": (lambda rows: rows[::-1], "as many examples, but rows or labels changed or reordered"),
    "a-label-edited": (
        lambda rows: [{**rows[0], "label": "sport" if rows[0]["label"] != "sport" else "tech"}, *rows[1:]],
        "as many examples, but rows or labels changed or reordered",
    ),
    "rows-added": (lambda rows: rows + rows[:5], "training and 6 test examples then"),
}


@pytest.fixture
def client_files_run(config_data_factory, tmp_path):
    """A 1-round run over two client files (a predefined partition): (config dict, {name: file})."""
    files = {}
    for index, name in enumerate(("alpha", "beta")):
        files[name] = tmp_path / f"{name}.csv"
        with files[name].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(make_records(30, seed=index))
    data = config_data_factory(rounds=1)
    data["data"] = {
        "validation_fraction": 0.0,
        "client_test_fraction": 0.2,
        "partition": {"kind": "predefined", "clients": [str(path) for path in files.values()]},
    }
    data["training"]["local_epochs"] = 1
    run_federation(build_simulation(parse_config(data)))
    return {**data, "federation": {**data["federation"], "rounds": 2}}, files


@pytest.mark.parametrize("edit", DATA_EDITS, ids=list(DATA_EDITS))
def test_resume_refuses_a_client_whose_data_changed_and_names_it(client_files_run, edit):
    data, files = client_files_run
    change, how = DATA_EDITS[edit]
    edit_rows(files["alpha"], change)
    with pytest.raises(ConfigError, match="cannot resume: the data of client alpha") as raised:
        run_federation(build_simulation(parse_config(data)), resume=True)
    assert how in str(raised.value) and "beta" not in str(raised.value)
    assert "--allow-data-change" in str(raised.value)


def test_allow_data_change_resumes_on_the_new_data_and_checkpoints_it(client_files_run, tmp_path):
    data, files = client_files_run
    edit_rows(files["alpha"], DATA_EDITS["rows-added"][0])
    history = run_federation(build_simulation(parse_config(data)), resume=True, allow_data_change=True)
    assert [record["round"] for record in history] == [1, 2]
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["data"]["alpha"]["examples"] + state["data"]["alpha"]["test_examples"] == 35
    with pytest.raises(ConfigError, match="--allow-data-change applies to --resume only"):
        run_federation(build_simulation(parse_config(data)), overwrite=True, allow_data_change=True)
