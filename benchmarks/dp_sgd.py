"""Sample-level DP (DP-SGD through Opacus) on every client against the same run without it, on the
bundled model and dataset: accuracy, each client's epsilon, and what per-example gradients cost.

Organisations, not users: BBC News split IID into `--clients` clients of a few hundred articles,
all of them in every round, all-MiniLM-L6-v2 with an FFA LoRA adapter (A frozen) of rank
`--lora-rank` on the query and value projections of `--lora-layers`, local SGD, FedAvgM on the
server. DP-SGD's noise falls on every trainable value, so a small adapter keeps its norm small.
The private run trains each client with DP-SGD: Poisson-sampled batches of expected size
`--batch-size`, every example's gradient clipped to `--clip`, Gaussian noise with multiplier
`--noise`; each client's epsilon at delta 1e-5 comes from its own RDP accountant. Prints a table
and writes benchmarks/results/dp_sgd.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedlm.config import parse_config
from fedlm.runtime import build_simulation


def config(args: argparse.Namespace, private: bool) -> dict:
    targets = [
        f"encoder.layer.{layer}.attention.self.{projection}"
        for layer in args.lora_layers
        for projection in ("query", "value")
    ]
    training = {
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "optimizer": args.optimizer,
        "local_epochs": args.local_epochs,
        "max_length": args.max_length,
        "threads": args.threads,
    }
    if private:
        training["dp_sgd"] = {"noise_multiplier": args.noise, "clip_norm": args.clip, "delta": 1e-5}
    return {
        "seed": 0,
        "model": {"name": "minilm"},
        "data": {
            "dataset": "bbc-news",
            "max_examples": args.examples,
            "validation_fraction": 0.2,
            "client_test_fraction": 0.0,
            "partition": {"kind": "iid", "num_clients": args.clients},
        },
        "federation": {"rounds": args.rounds, "clients_per_evaluation": 0},
        "training": training,
        "peft": {"method": "lora", "r": args.lora_rank, "aggregation": "ffa", "target_modules": targets},
        "strategy": {"kind": "fedavgm", "server_lr": 1.0, "momentum": args.momentum},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--momentum", type=float, default=0.5, help="the server's (FedAvgM)")
    parser.add_argument("--lora-rank", type=int, default=1)
    parser.add_argument("--lora-layers", type=int, nargs="+", default=[5], help="encoder layers (0-5) adapted")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--noise", type=float, default=1.2)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--private-only", action="store_true", help="skip the non-private run")
    args = parser.parse_args()
    rows = []
    for private in (True,) if args.private_only else (False, True):
        simulation = build_simulation(parse_config(config(args, private)))
        start = time.perf_counter()
        history = simulation.server.fit(args.rounds, args.local_epochs, None, simulation.validation, 0)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "run": f"DP-SGD (z {args.noise}, C {args.clip})" if private else "non-private",
                "val_accuracy": history[-1]["val_accuracy"],
                "accuracy_by_round": [record["val_accuracy"] for record in history],
                "epsilon_max": history[-1].get("dp_sgd_epsilon_max"),
                "seconds_per_round": seconds / args.rounds,
                "train_seconds_per_round": sum(record["train_seconds"] for record in history) / args.rounds,
            }
        )
    table = Table(
        title=f"{args.clients} clients of {int(args.examples * 0.8) // args.clients} articles, {args.rounds} rounds, "
        f"FFA LoRA r={args.lora_rank} on layers {args.lora_layers}, {args.optimizer} lr {args.lr}, batch {args.batch_size}"
    )
    for column in ("run", "val acc", "accuracy by round", "client epsilon (delta 1e-5)", "train s / round"):
        table.add_column(column, justify="left" if column in ("run", "accuracy by round") else "right")
    for row in rows:
        epsilon = "" if row["epsilon_max"] is None else f"{row['epsilon_max']:.2f}"
        by_round = " ".join(f"{value:.2f}" for value in row["accuracy_by_round"])
        table.add_row(
            row["run"], f"{row['val_accuracy']:.3f}", by_round, epsilon, f"{row['train_seconds_per_round']:.1f}"
        )
    Console(width=160).print(table)
    out = Path(__file__).parent / "results" / "dp_sgd.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
