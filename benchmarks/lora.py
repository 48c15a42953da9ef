"""LoRA against full-parameter FedAvg on the bundled model and dataset: bytes, accuracy, time.

Methods on the same partition and rounds (all-MiniLM-L6-v2, BBC News, 4 IID clients): full
fine-tuning; LoRA r=8 on the attention projections (query, value) with FedIT averaging, with
SVD re-factoring, with FFA (A frozen), with FLoRA-style stacking; clients of ranks 4, 8, 16 and 8
with svd and with stack; LoRA with int8 uploads. Reports the global model's trainable parameters,
bytes uploaded and downloaded per client per round (measured), federated-validation accuracy
after the last round, seconds per round, and a local training step time for LoRA vs full.

Prints a table and writes benchmarks/results/lora.json. Not a test: nothing asserts time.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedlm.config import parse_config
from fedlm.models.federated import federated_spec
from fedlm.runtime import build_simulation

METHODS = {
    "full FedAvg": {},
    "LoRA r=8 fedit": {"peft": {"method": "lora", "r": 8, "aggregation": "fedit"}},
    "LoRA r=8 svd": {"peft": {"method": "lora", "r": 8, "aggregation": "svd"}},
    "LoRA r=8 ffa": {"peft": {"method": "lora", "r": 8, "aggregation": "ffa"}},
    "LoRA r=8 stack": {"peft": {"method": "lora", "r": 8, "aggregation": "stack"}},
    "LoRA r=4/8/16/8 svd": {"peft": {"method": "lora", "r": 16, "client_ranks": [4, 8, 16, 8], "aggregation": "svd"}},
    "LoRA r=4/8/16/8 stack": {
        "peft": {"method": "lora", "r": 16, "client_ranks": [4, 8, 16, 8], "aggregation": "stack"}
    },
    "LoRA r=8 fedit + int8 upload": {
        "peft": {"method": "lora", "r": 8, "aggregation": "fedit"},
        "communication": {"upload": {"kind": "int8", "block": 2048}},
    },
}


def config(args: argparse.Namespace, method: dict) -> dict:
    # LoRA trains far fewer weights and wants a larger learning rate than full fine-tuning
    learning_rate = args.lr_lora if "peft" in method else args.lr_full
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
        "training": {"batch_size": 16, "learning_rate": learning_rate, "max_length": args.max_length, "threads": 2},
        **method,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr-full", type=float, default=1e-4)
    parser.add_argument("--lr-lora", type=float, default=5e-3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    rows = []
    for name in args.methods:
        simulation = build_simulation(parse_config(config(args, METHODS[name])))
        history = simulation.server.fit(args.rounds, 1, None, simulation.validation, 0)
        clients = len(simulation.server.clients)
        rows.append(
            {
                "method": name,
                "trained_parameters": federated_spec(simulation.server.get_model()).numel,
                "upload_bytes_per_client_round": statistics.mean(r["bytes_up"] for r in history) / clients,
                "download_bytes_per_client_round": statistics.mean(r["bytes_down"] for r in history) / clients,
                "val_accuracy": history[-1]["val_accuracy"],
                "seconds_per_round": statistics.mean(r["seconds"] for r in history),
                "step_seconds": statistics.mean(r["train_seconds"] / r["train_examples"] * 16 for r in history),
                "lora_error": history[-1].get("lora_aggregation_error", {}).get("overall"),
            }
        )
    full = next((row for row in rows if row["method"] == "full FedAvg"), None)
    table = Table(title=f"{args.clients} clients, {args.rounds} rounds, {args.examples} BBC articles, all-MiniLM-L6-v2")
    for column in (
        "method",
        "trained params",
        "upload / client / round",
        "download",
        "vs full",
        "val acc",
        "s / round",
        "s / step",
        "LoRA error",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        ratio = (
            ""
            if full is None
            else f"{row['upload_bytes_per_client_round'] / full['upload_bytes_per_client_round']:.2%}"
        )
        error = "" if row["lora_error"] is None else f"{row['lora_error']:.3f}"
        table.add_row(
            row["method"], f"{row['trained_parameters']:,}", f"{row['upload_bytes_per_client_round'] / 1e6:.2f} MB",
            f"{row['download_bytes_per_client_round'] / 1e6:.2f} MB", ratio, f"{row['val_accuracy']:.3f}", f"{row['seconds_per_round']:.1f}", f"{row['step_seconds']:.3f}", error,
        )  # fmt: skip
    Console(width=160).print(table)
    out = Path(__file__).parent / "results" / "lora.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
