"""Per-round overhead of fedlm on Flower's deployment engine, next to the in-process runtime.

For each model (a tiny 2-layer BERT and the bundled 22.7M-parameter all-MiniLM-L6-v2, ~91 MB of
float32 each way per client), starts a SuperLink and 2 SuperNodes on 127.0.0.1 (TLS, SuperNode
authentication; `LocalDeployment`), runs FedAvg rounds with every client training on its own
small CSV, and reports round time, the slowest client's training time, and the overhead (round
time minus training; no evaluation is configured). The same config then runs in process.

Prints a table and writes benchmarks/results/flower_overhead.json. Not a test: nothing asserts time.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from fedlm.config import load_config
from fedlm.data import load_bundled_dataset
from fedlm.runtime import build_simulation, run_federation
from fedlm.runtime.flower.local_deployment import LocalDeployment
from fedlm.tasks.classification import load_classifier

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import build_tiny_model_folder  # noqa: E402  (the tests' tiny model, built offline)


def write_clients(folder: Path, clients: int, per_client: int) -> list[Path]:
    data = load_bundled_dataset("bbc-news")
    paths = []
    for index in range(clients):
        path = folder / f"client-{index}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["text", "label"])
            writer.writeheader()
            for row in range(index * per_client, (index + 1) * per_client):
                writer.writerow({"text": data.texts[row], "label": data.labels[row]})
        paths.append(path)
    return paths


def write_config(folder: Path, model: str, clients: list[Path], rounds: int, output: str) -> Path:
    config = {
        "seed": 0,
        "output_dir": str(folder / output),
        "model": {"name": model},
        "data": {
            "validation_fraction": 0.0,
            "client_test_fraction": 0.0,
            "partition": {"kind": "predefined", "clients": [str(path) for path in clients]},
        },
        "federation": {"rounds": rounds, "clients_per_evaluation": 0},
        "training": {"batch_size": 8, "learning_rate": 1e-4, "max_length": 32, "threads": 1},
    }
    path = folder / f"{output}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def summarize(records: list[dict], parallel: bool) -> dict[str, float]:
    later = [record for record in records if record["round"] >= 2] or records  # round 1 warms caches
    training = "train_seconds_max" if parallel else "train_seconds"
    return {
        "round_seconds": statistics.mean(record["seconds"] for record in later),
        "train_seconds": statistics.mean(record[training] for record in later),
        "overhead_seconds": statistics.mean(record["overhead_seconds"] for record in later),
        "megabytes_per_round": statistics.mean(record["bytes_up"] + record["bytes_down"] for record in later) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-client", type=int, default=16, help="training examples per client")
    parser.add_argument("--models", nargs="+", default=["tiny", "minilm"])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedlm-flower-bench-") as tmp:
        folder = Path(tmp)
        clients = write_clients(folder, 2, args.per_client)
        for model in args.models:
            name = str(build_tiny_model_folder(folder / "tiny")) if model == "tiny" else model
            start = time.perf_counter()
            parameters = sum(p.numel() for p in load_classifier(name, num_labels=5, seed=0).parameters())
            load_seconds = time.perf_counter() - start
            config = write_config(folder, name, clients, args.rounds, f"{model}-flower")
            with LocalDeployment(folder / f"{model}-deployment") as deployment:
                for path in clients:
                    deployment.start_node(path.stem, {"dataset": str(path)})
                result = deployment.run(config)
                if result.returncode != 0:
                    raise SystemExit(f"the {model} deployment run failed:\n{result.stdout}\n{result.stderr}")
            deployed = [json.loads(line) for line in (folder / f"{model}-flower" / "metrics.jsonl").open()][1:]
            local_config = write_config(folder, name, clients, args.rounds, f"{model}-local")
            local = run_federation(build_simulation(load_config(local_config)))
            for runtime, records, parallel in (("flower", deployed, True), ("in-process", local, False)):
                results.append(
                    {"model": model, "parameters": parameters, "runtime": runtime, "model_load_seconds": load_seconds,
                     **summarize(records, parallel)}
                )  # fmt: skip
    table = Table(title=f"per-round cost, 2 clients x {args.per_client} examples, mean of rounds 2-{args.rounds}")
    for column in ("model", "parameters", "runtime", "round s", "training s", "overhead s", "MB moved", "model load s"):
        table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
    for row in results:
        table.add_row(
            row["model"], f"{row['parameters']:,}", row["runtime"], f"{row['round_seconds']:.1f}",
            f"{row['train_seconds']:.1f}", f"{row['overhead_seconds']:.1f}", f"{row['megabytes_per_round']:.1f}",
            f"{row['model_load_seconds']:.2f}",
        )  # fmt: skip
    Console(width=140).print(table)
    out = Path(__file__).parent / "results" / "flower_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
