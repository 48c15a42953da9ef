"""Golden runs: a few configs over the tiny model must keep giving the same final model (the
sha256 of model.safetensors) and the same metrics.jsonl, bit for bit, so that a refactoring
cannot change results silently. Secure and homomorphic aggregation and DP-SGD draw their
randomness (stochastic rounding, CKKS noise, Opacus' noise) from the operating system on
purpose, so their results are not reproducible and not here.

Bit for bit holds on the machine the values were recorded on (same CPU model, kernel dispatch
and torch): float kernels differ by CPU (AVX2 or AVX-512, MKL's paths per vendor), so elsewhere
the metrics are compared to a relative 1e-4, and each tensor's sum and sum of squares to 1e-4 of
its scale (`model_differences`; not the key biases, which stay at rounding noise): far below any change a refactoring would make and far above the
last-bit rounding differences between CPUs. A run that quantizes its updates to int8 turns a
last-bit difference into a whole quantization step here and there, so its tensors get 1e-3.

The expected values are in tests/fixtures/golden_runs.json. A change that is meant to change
results regenerates them with `FEDLM_UPDATE_GOLDEN=1 pytest tests/integration/test_golden_runs.py`
and says why in its commit."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def machine() -> str:
    """What bit-for-bit results depend on: the CPU, the kernels torch dispatches to, torch itself."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
    )
    return f"{platform.machine()} {model} {torch.backends.cpu.get_cpu_capability()} torch {torch.__version__}"


def model_summary(path: Path) -> dict[str, list[float]]:
    """Each tensor's sum and sum of squares (float64): what a tolerant comparison looks at."""
    tensors = load_file(path)
    return {name: [float(t.double().sum()), float(t.double().square().sum())] for name, t in sorted(tensors.items())}


def differences(found, expected, where: str = "") -> list[str]:
    """Where `found` and `expected` (JSON values) differ: numbers by more than a relative 1e-4,
    anything else at all."""
    if isinstance(expected, dict) and isinstance(found, dict) and found.keys() == expected.keys():
        return [line for key in expected for line in differences(found[key], expected[key], f"{where}/{key}")]
    if isinstance(expected, list) and isinstance(found, list) and len(found) == len(expected):
        return [line for i, pair in enumerate(zip(found, expected)) for line in differences(*pair, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(found, numbers) and isinstance(expected, numbers) and not isinstance(found, bool):
        return [] if math.isclose(found, expected, rel_tol=1e-4, abs_tol=1e-7) else [f"{where}: {found} != {expected}"]
    return [] if found == expected else [f"{where}: {found!r} != {expected!r}"]


# attention's key bias gets no gradient (softmax ignores a constant added to all of a query's
# scores): training leaves it at rounding noise (with int8 upload, quantization noise), which
# differs by CPU and says nothing about the algorithm
GRADIENT_FREE = "attention.self.key.bias"


def model_differences(found: dict[str, torch.Tensor], expected: dict[str, list[float]], rel_tol: float) -> list[str]:
    """Tensors whose sum or sum of squares differs from `expected` (`model_summary`) by more
    than `rel_tol` of its scale: the tensor's sum of absolute values, or its sum of squares."""
    if found.keys() != expected.keys():
        return [f"tensor names differ: {sorted(found.keys() ^ expected.keys())}"]
    lines = []
    for name, tensor in found.items():
        if name.endswith(GRADIENT_FREE):
            continue
        tensor = tensor.double()
        sums = [float(tensor.sum()), float(tensor.square().sum())]
        scales = [float(tensor.abs().sum()), sums[1]]
        for what, value, reference, scale in zip(["sum", "sum of squares"], sums, expected[name], scales):
            if abs(value - reference) > rel_tol * scale:
                lines.append(f"{name} {what}: {value} != {reference} (scale {scale:.3g})")
    return lines


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
    model_path = output_dir / "model" / "model.safetensors"
    return {
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "model_summary": model_summary(model_path),
        "model": load_file(model_path),
        "metrics": _without_timing(read_metrics(output_dir)),
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_golden_config_gives_the_same_model_and_metrics(name, golden_data, tiny_model_dir, tmp_path):
    result = golden_run(name, golden_data, tiny_model_dir, tmp_path / "run")
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"runs": {}}
    if UPDATE:
        golden["machine"] = machine()
        recorded = {key: value for key, value in result.items() if key != "model"}
        golden["runs"] = dict(sorted({**golden["runs"], name: recorded}.items()))
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    assert name in golden["runs"], f"no golden values for {name}: run with FEDLM_UPDATE_GOLDEN=1 once"
    expected = golden["runs"][name]
    if machine() == golden["machine"]:
        assert result["metrics"] == expected["metrics"]
        assert result["model_sha256"] == expected["model_sha256"]
    else:
        assert differences(result["metrics"], expected["metrics"]) == []
        rel_tol = 1e-3 if "int8" in name else 1e-4
        assert model_differences(result["model"], expected["model_summary"], rel_tol) == []
