"""Private federated fine-tuning on the bundled model and dataset: client-level DP with secure
aggregation against the same run without them.

Client-level DP needs many clients per round (the noise on the average falls as 1 / clients per
round) and few federated values (the noise's norm grows as their square root), so this simulates
users, not organisations: BBC News (all 2,225 articles, 20% held out for validation) split IID
into `--clients` users of about one article each, `--per-round` of them sampled per round, and
all-MiniLM-L6-v2 (inputs truncated to `--max-length` tokens) with a small FFA LoRA adapter: rank
`--lora-rank` on the query and value projections of the last encoder layer(s) `--lora-layers`,
A frozen, so only B and the classification head are federated (2,693 values at the defaults).

Each user takes one local SGD step (learning rate `--lr`, gradient norm capped at 1, so the update
norm is at most `--lr`); the server applies FedAvgM (server learning rate 1, momentum
`--momentum`). The private run clips each update to `--clip` (by default equal to `--lr`, so
clipping changes little and the noise is the whole difference), adds the Gaussian noise on the
clients (distributed DP, `--noise` multiplier) and aggregates securely (SecAgg+); its epsilon
comes from the RDP accountant at delta 1e-5. Validation accuracy is measured every
`--eval-every` rounds and after the last. Training uses `--threads` torch threads (default 1).
Prints a table and writes benchmarks/results/private_training.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedlm.config import parse_config
from fedlm.models.federated import federated_spec
from fedlm.runtime import build_simulation


def config(args: argparse.Namespace, private: bool) -> dict:
    targets = [
        f"encoder.layer.{layer}.attention.self.{projection}"
        for layer in args.lora_layers
        for projection in ("query", "value")
    ]
    data = {
        "seed": 0,
        "model": {"name": "minilm"},
        "data": {
            "dataset": "bbc-news",
            "max_examples": args.examples,
            "validation_fraction": 0.2,
            "client_test_fraction": 0.0,
            "partition": {"kind": "iid", "num_clients": args.clients},
        },
        "federation": {"rounds": args.rounds, "clients_per_round": args.per_round, "clients_per_evaluation": 0},
        "training": {
            "batch_size": 16,
            "learning_rate": args.lr,
            "optimizer": args.optimizer,
            "max_length": args.max_length,
            "local_epochs": args.local_epochs,
            "threads": args.threads,
        },
        "peft": {"method": "lora", "r": args.lora_rank, "aggregation": "ffa", "target_modules": targets},
        "strategy": {"kind": "fedavgm", "server_lr": 1.0, "momentum": args.momentum},
    }
    if private:
        clip = args.lr if args.clip is None else args.clip
        data["dp"] = {"noise_multiplier": args.noise, "clip_norm": clip, "noise": "clients", "delta": 1e-5}
        data["secure_aggregation"] = {"clip_range": clip}
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=None, help="a seeded subset; all 2,225 articles by default")
    parser.add_argument("--clients", type=int, default=1780)
    parser.add_argument("--per-round", type=int, default=356)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--lr", type=float, default=3.0)
    parser.add_argument("--momentum", type=float, default=0.9, help="FedAvgM's server momentum")
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=None, help="default: --lr")
    parser.add_argument("--lora-rank", type=int, default=1)
    parser.add_argument("--lora-layers", type=int, nargs="+", default=[5], help="encoder layers (0-5) adapted")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 2 thrash when another process shares a 2-core machine"
    )
    args = parser.parse_args()
    rows = []
    for private in (False, True):
        simulation = build_simulation(parse_config(config(args, private)))
        server = simulation.server
        federated_values = federated_spec(server.clients[0].model).numel
        start = time.perf_counter()
        history = []
        for round_number in range(1, args.rounds + 1):
            evaluate = round_number % args.eval_every == 0 or round_number == args.rounds
            validation = simulation.validation if evaluate else None
            history.append(server.run_round(args.local_epochs, args.per_round, validation, 0))
        rows.append(
            {
                "run": "DP + secure aggregation" if private else "non-private",
                "val_accuracy": history[-1]["val_accuracy"],
                "accuracy_by_round": {
                    record["round"]: record["val_accuracy"] for record in history if "val_accuracy" in record
                },
                "epsilon": history[-1].get("epsilon"),
                "seconds_per_round": (time.perf_counter() - start) / args.rounds,
                "federated_values": federated_values,
            }
        )
    console = Console(width=160)
    console.print(
        f"{args.clients} clients, {args.per_round} per round, {args.rounds} rounds, FFA LoRA r={args.lora_rank} "
        f"({rows[0]['federated_values']:,} federated values), SGD lr {args.lr}, noise {args.noise}, "
        f"clip {args.lr if args.clip is None else args.clip}"
    )
    table = Table()
    for column in ("run", "val acc", "accuracy by round", "epsilon (delta 1e-5)", "s / round"):
        table.add_column(column, justify="left" if column in ("run", "accuracy by round") else "right")
    for row in rows:
        epsilon = "" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        by_round = " ".join(f"{accuracy:.2f}" for accuracy in row["accuracy_by_round"].values())
        table.add_row(row["run"], f"{row['val_accuracy']:.3f}", by_round, epsilon, f"{row['seconds_per_round']:.1f}")
    console.print(table)
    gap = rows[0]["val_accuracy"] - rows[1]["val_accuracy"]
    print(f"gap: {100 * gap:.1f} accuracy points")
    out = Path(__file__).parent / "results" / "private_training.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "runs": rows, "gap": gap}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
