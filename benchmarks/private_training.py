"""Private federated fine-tuning on the bundled model and dataset: client-level DP with secure
aggregation against the same run without them.

Client-level DP needs many clients per round (the noise on the average falls as 1 / clients per
round), so this simulates users, not organisations: BBC News split IID into `--clients` clients
of a few articles each, `--per-round` of them sampled per round, all-MiniLM-L6-v2 with an FFA
LoRA adapter (A frozen, B and the head federated: a small vector). The private run clips each
update to `--clip`, adds the noise on the clients (distributed DP, `--noise` multiplier) and
aggregates securely (SecAgg+); its epsilon comes from the RDP accountant at delta 1e-5.
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
from fedlm.runtime import build_simulation


def config(args: argparse.Namespace, private: bool) -> dict:
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
        "training": {"batch_size": 16, "learning_rate": args.lr, "local_epochs": args.local_epochs, "threads": 2},
        "peft": {"method": "lora", "r": 8, "aggregation": "ffa"},
        "strategy": {"kind": "fedavgm", "server_lr": 1.0, "momentum": 0.9},
    }
    if private:
        data["dp"] = {"noise_multiplier": args.noise, "clip_norm": args.clip, "noise": "clients", "delta": 1e-5}
        data["secure_aggregation"] = {"clip_range": args.clip}
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=400)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=0.1)
    args = parser.parse_args()
    rows = []
    for private in (False, True):
        simulation = build_simulation(parse_config(config(args, private)))
        start = time.perf_counter()
        history = simulation.server.fit(args.rounds, args.local_epochs, args.per_round, simulation.validation, 0)
        rows.append(
            {
                "run": "DP + secure aggregation" if private else "non-private",
                "val_accuracy": history[-1]["val_accuracy"],
                "accuracy_by_round": [record["val_accuracy"] for record in history],
                "epsilon": history[-1].get("epsilon"),
                "seconds_per_round": (time.perf_counter() - start) / args.rounds,
            }
        )
    table = Table(
        title=f"{args.clients} clients, {args.per_round} per round, {args.rounds} rounds, FFA LoRA r=8, "
        f"noise {args.noise}, clip {args.clip}"
    )
    for column in ("run", "val acc", "epsilon (delta 1e-5)", "s / round"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        epsilon = "" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        table.add_row(row["run"], f"{row['val_accuracy']:.3f}", epsilon, f"{row['seconds_per_round']:.1f}")
    Console(width=140).print(table)
    out = Path(__file__).parent / "results" / "private_training.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
