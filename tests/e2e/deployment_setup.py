"""What the Flower tests share: three clients' files, a run config over them that a simulation
reproduces exactly (a predefined partition), and the comparison with that simulation."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from conftest import make_records
from fedlm.config import load_config
from fedlm.runtime import build_simulation, run_federation

NAMES = ["alpha", "beta", "gamma"]
# every message to a real node is a fresh ClientApp process that imports torch and transformers and
# loads the model (BENCHMARKS.md): a test that asserts nothing of the clients' test metrics
# skips their evaluation, a third to a half of its processes
NO_CLIENT_EVALUATION = {"clients_per_evaluation": 0}


def write_client_files(folder: Path) -> dict[str, Path]:
    """One CSV of 60 synthetic rows per client name."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for index, name in enumerate(NAMES):
        files[name] = folder / f"{name}.csv"
        with files[name].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["text", "label"])
            writer.writeheader()
            writer.writerows(make_records(60, seed=index))
    return files


def config_writer(folder: Path, model_dir: Path, client_files: dict[str, Path]) -> Callable[..., Path]:
    """A function writing a run config over the client files into `folder`; its keyword
    arguments override the config's sections."""

    def write(name: str = "config", **sections) -> Path:
        config = {
            "seed": 3,
            "output_dir": str(folder / name),
            "model": {"name": str(model_dir)},
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
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


def simulate(config_path: Path, output_dir: Path, **changes) -> Path:
    """The simulation of `config_path` (with `changes` to its sections' top level) into `output_dir`."""
    config = load_config(config_path)
    run_federation(build_simulation(config.model_copy(update={"output_dir": output_dir, **changes})))
    return output_dir


def same_model(first: Path, second: Path) -> bool:
    a, b = load_file(first / "model" / "model.safetensors"), load_file(second / "model" / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def largest_difference(first: Path, second: Path) -> float:
    a, b = load_file(first / "model" / "model.safetensors"), load_file(second / "model" / "model.safetensors")
    return max(float((a[key] - b[key]).abs().max()) for key in a)
