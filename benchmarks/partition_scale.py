"""Partitioning speed and simulation memory as the number of clients grows.

1. Partitioning 1,000,000 examples (10 labels) into 100, 1,000 and 10,000 clients on one core,
   for each scheme (target: Dirichlet into 10,000 clients in under 5 s).
2. Peak memory of a simulation (a small BERT, one round, 10 clients sampled and 10 evaluated)
   over the same 100,000-row CSV split into 10, 100 and 1,000 clients, each in a fresh process,
   against a process that only loads the data and the model (target: 1,000 clients need no more
   than 10 clients do, beyond the data itself).
3. A 1,000,000-row CSV split into 1,000 clients: load, partition, one round, peak memory.

Prints tables and writes benchmarks/results/partition_scale.json. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "market shares bank profit game team player win film music star award vote party law phone data chip".split()


def partition_speed(num_examples: int) -> list[dict]:
    import numpy as np

    from fedlm.data.partition import DirichletPartitioner, IidPartitioner, QuantityPartitioner, ShardsPartitioner

    labels = np.random.default_rng(0).integers(0, 10, num_examples).tolist()
    rows = []
    for num_clients in (100, 1_000, 10_000):
        schemes = {
            "iid": IidPartitioner(num_clients),
            "dirichlet alpha=0.5 min_size=10": DirichletPartitioner(num_clients, alpha=0.5, min_size=10),
            "quantity power_law": QuantityPartitioner(num_clients, "power_law", exponent=1.0),
            "shards k=2": ShardsPartitioner(num_clients, labels_per_client=2),
        }
        for name, partitioner in schemes.items():
            best = min(_timed(lambda p=partitioner: p.partition(labels)) for _ in range(3))
            rows.append({"scheme": name, "examples": num_examples, "clients": num_clients, "seconds": best})
    return rows


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def write_csv(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with path.open("w") as handle:
        handle.write("text,label\n")
        for _ in range(rows):
            label = rng.randrange(10)
            words = rng.sample(WORDS, 6) + [WORDS[label]] * 2
            handle.write(f"{' '.join(words)},topic{label}\n")


def write_small_bert(folder: Path) -> None:
    from transformers import BertConfig, BertModel

    from fedlm.models import load_tokenizer
    from fedlm.models.loading import quiet_transformers

    tokenizer = load_tokenizer("minilm")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    with quiet_transformers():
        BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def child(csv_path: str, model_dir: str, num_clients: int, data_only: bool) -> None:
    """Runs in a fresh process; prints one JSON line."""
    import torch

    torch.set_num_threads(2)
    from fedlm.config import parse_config
    from fedlm.data import load_text_dataset
    from fedlm.runtime import build_simulation
    from fedlm.tasks.classification import load_classifier

    start = time.perf_counter()
    if data_only:
        data = load_text_dataset(csv_path)
        load_classifier(model_dir, num_labels=10, seed=0)
        result = {"examples": len(data)}
    else:
        config = parse_config(
            {
                "model": {"name": model_dir},
                "data": {
                    "dataset": csv_path,
                    "validation_fraction": 0.01,
                    "client_test_fraction": 0.1,
                    "partition": {"kind": "dirichlet", "alpha": 1.0, "num_clients": num_clients, "min_size": 10},
                },
                "federation": {"clients_per_round": 10, "clients_per_evaluation": 10, "rounds": 1},
                "training": {"batch_size": 64, "max_length": 32, "learning_rate": 1e-3},
            }
        )
        simulation = build_simulation(config)
        built = time.perf_counter() - start
        record = simulation.server.run_round(1, 10, simulation.validation, 10)
        result = {
            "build_seconds": built,
            "round_seconds": record["seconds"],
            "trained_examples": record["train_examples"],
            "val_accuracy": record["val_accuracy"],
        }
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run_child(csv_path: Path, model_dir: Path, num_clients: int, data_only: bool = False) -> dict:
    command = [sys.executable, __file__, "--child", str(csv_path), str(model_dir), str(num_clients)]
    if data_only:
        command.append("--data-only")
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("CSV", "MODEL", "CLIENTS"), help=argparse.SUPPRESS)
    parser.add_argument("--data-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-million", action="store_true", help="skip part 3")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.data_only)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    results: dict = {"partition_speed": partition_speed(1_000_000)}
    table = Table(title="Partitioning 1,000,000 examples (10 labels), one core, best of 3")
    for column in ("scheme", "clients", "seconds"):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    for row in results["partition_speed"]:
        table.add_row(row["scheme"], f"{row['clients']:,}", f"{row['seconds']:.3f}")
    console.print(table)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_small_bert(folder / "bert")
        write_csv(folder / "100k.csv", 100_000)
        memory = [
            {"clients": "data + model only", **run_child(folder / "100k.csv", folder / "bert", 0, data_only=True)}
        ]
        for num_clients in (10, 100, 1_000):
            memory.append({"clients": num_clients, **run_child(folder / "100k.csv", folder / "bert", num_clients)})
        results["memory_100k_rows"] = memory
        table = Table(title="Simulation over a 100,000-row CSV: one round, 10 clients trained and 10 evaluated")
        for column in ("clients", "peak RSS (MB)", "build (s)", "round (s)", "examples trained"):
            table.add_column(column, justify="right")
        for row in memory:
            table.add_row(
                str(row["clients"]),
                f"{row['peak_rss_mb']:.0f}",
                f"{row.get('build_seconds', row['seconds']):.1f}",
                f"{row.get('round_seconds', 0):.1f}",
                str(row.get("trained_examples", "")),
            )
        console.print(table)

        if not args.skip_million:
            write_csv(folder / "1m.csv", 1_000_000)
            million = {"clients": 1_000, **run_child(folder / "1m.csv", folder / "bert", 1_000)}
            baseline = run_child(folder / "1m.csv", folder / "bert", 0, data_only=True)
            results["million_rows"] = {"simulation": million, "data_and_model_only": baseline}
            console.print(
                f"1,000,000-row CSV into 1,000 clients: built in {million['build_seconds']:.1f} s, one round in "
                f"{million['round_seconds']:.1f} s, peak RSS {million['peak_rss_mb']:.0f} MB "
                f"(loading the data and model alone: {baseline['peak_rss_mb']:.0f} MB)"
            )
    out = Path(__file__).parent / "results" / "partition_scale.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
