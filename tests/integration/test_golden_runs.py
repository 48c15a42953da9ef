"""Golden runs: a few configs over the tiny model must keep giving the same final model (the
sha256 of model.safetensors) and the same metrics.jsonl, bit for bit, so that a refactoring
cannot change results silently. Secure and homomorphic aggregation and DP-SGD draw their
randomness (stochastic rounding, CKKS noise, Opacus' noise) from the operating system on
purpose, so their results are not reproducible and not here.

The expected values are in tests/fixtures/golden_runs.json. A change that is meant to change
results regenerates them with `FEDLM_UPDATE_GOLDEN=1 pytest tests/integration/test_golden_runs.py`
and says why in its commit."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import FIXTURES, make_records, read_metrics
from fedlm.config import parse_config
from fedlm.runtime import build_simulation, run_federation

GOLDEN = FIXTURES / "golden_runs.json"
UPDATE = os.environ.get("FEDLM_UPDATE_GOLDEN") == "1"

# name -> the sections that differ from the base config below
CONFIGS: dict[str, dict] = {
    "fedavg": {},
    "fedadam_trimmed_mean": {"strategy": {"kind": "fedadam", "robust": {"kind": "trimmed_mean", "beta": 0.25}}},
    "fedprox_int8_upload": {
        "strategy": {"kind": "fedprox", "mu": 0.1},
        "communication": {"upload": {"kind": "int8", "error_feedback": True}, "download": {"kind": "float16"}},
    },
    "scaffold_sgd": {"strategy": {"kind": "scaffold"}, "training": {"optimizer": "sgd", "learning_rate": 0.05}},
    "lora_svd_mixed_ranks": {"peft": {"method": "lora", "r": 4, "aggregation": "svd", "client_ranks": [4, 2]}},
    "lora_stack_mixed_ranks": {"peft": {"method": "lora", "r": 4, "aggregation": "stack", "client_ranks": [4, 2]}},
    "dp_server_noise": {"dp": {"noise_multiplier": 0.5, "clip_norm": 0.5}},
    "distillation": {"algorithm": {"kind": "distillation", "public_data": {"held_out": 0.2}, "epochs": 1}},
    "ensemble_distillation": {
        "algorithm": {"kind": "ensemble_distillation", "public_data": {"held_out": 0.2}, "epochs": 1}
    },
}


def _without_timing(value):
    """`value` without the keys whose values depend on timing: seconds, and byte counts (a
    message's JSON header carries the client's training time)."""
    if isinstance(value, dict):
        return {
            key: _without_timing(item) for key, item in value.items() if "seconds" not in key and "bytes" not in key
        }
    if isinstance(value, list):
        return [_without_timing(item) for item in value]
    return value


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("golden") / "topics.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_records(200, seed=0))
    return path


def golden_run(name: str, data: Path, model: Path, output_dir: Path) -> dict:
    config = {
        "seed": 7,
        "output_dir": str(output_dir),
        "model": {"name": str(model)},
        "data": {
            "dataset": str(data),
            "validation_fraction": 0.2,
            "client_test_fraction": 0.2,
            "partition": {"kind": "iid", "num_clients": 4},
        },
        "federation": {"rounds": 2},
        "training": {"batch_size": 16, "learning_rate": 3e-3, "max_length": 32, "threads": 1},
    }
    for section, values in CONFIGS[name].items():
        config[section] = {**config.get(section, {}), **values}
    run_federation(build_simulation(parse_config(config, source=name)))
    model_bytes = (output_dir / "model" / "model.safetensors").read_bytes()
    return {
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "metrics": _without_timing(read_metrics(output_dir)),
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_golden_config_gives_the_same_model_and_metrics(name, golden_data, tiny_model_dir, tmp_path):
    result = golden_run(name, golden_data, tiny_model_dir, tmp_path / "run")
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if UPDATE:
        golden[name] = result
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
    assert name in golden, f"no golden values for {name}: run with FEDLM_UPDATE_GOLDEN=1 once"
    assert result["metrics"] == golden[name]["metrics"]
    assert result["model_sha256"] == golden[name]["model_sha256"]
