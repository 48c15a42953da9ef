"""Exact checkpoint and resume: 6 rounds equal 3 rounds + kill + resume, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

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


@pytest.mark.parametrize("strategy", [{"kind": "fedadam", "server_lr": 0.01}, {"kind": "scaffold"}])
def test_killed_run_resumes_bit_for_bit(tmp_path, config_data_factory, strategy):
    data = config_data_factory(num_clients=4, rounds=6, strategy=strategy, federation={"clients_per_round": 3})
    if strategy["kind"] == "scaffold":
        data["training"]["optimizer"] = "sgd"
    data["training"]["local_epochs"] = 1
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    for folder in (straight, interrupted):
        folder.mkdir()
        (folder / "run.yaml").write_text(yaml.safe_dump(data))

    assert start_run(straight).wait(timeout=300) == 0
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
