"""Federated distillation against FedAvg on the bundled model and dataset: accuracy and bytes.

BBC News with Dirichlet(0.5) label skew over 3 clients; 20% of the articles are the federated
validation set and 20% of the rest the public set (held back from the clients, labels unused).
Methods on the same partition, rounds and local epochs:
  - FedAvg: three all-MiniLM-L6-v2 clients, weights averaged;
  - FedDF: FedAvg, then the average distils from the clients' ensemble on the public set;
  - federated distillation: clients with MiniLM, a 3-layer MiniLM (its first 3 layers, a smaller
    pretrained BERT) and MiniLM send logits on the public set; the server trains a MiniLM student;
  - local only: each of those distillation clients' own model (with no digest step it only ever
    learns from its own data), on the same validation set.
Prints a table (validation accuracy, bytes up and down per client per round, seconds per round)
and writes benchmarks/results/distillation.json. Not a test: nothing asserts time.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedlm.algorithms import WeightAveraging
from fedlm.config import parse_config
from fedlm.models.federated import set_federated_vector
from fedlm.models.registry import resolve_model_path
from fedlm.runtime import build_simulation
from fedlm.tasks.classification import evaluate_model

RESULTS = Path(__file__).parent / "results"


def three_layer_minilm() -> str:
    """MiniLM cut to its first 3 layers (weights kept): a smaller pretrained BERT, saved once."""
    from transformers import AutoModel, AutoTokenizer

    folder = RESULTS / "minilm-l3"
    if not (folder / "config.json").exists():
        source = resolve_model_path("minilm")
        model = AutoModel.from_pretrained(source)
        model.encoder.layer = model.encoder.layer[:3]
        model.config.num_hidden_layers = 3
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def config(args: argparse.Namespace, algorithm: dict) -> dict:
    """Every method holds the same public slice back from the clients, so all see the same split."""
    return {
        "seed": 0,
        "model": {"name": "minilm"},
        "data": {
            "dataset": "bbc-news",
            "max_examples": args.examples,
            "validation_fraction": 0.2,
            "client_test_fraction": 0.0,
            "partition": {"kind": "dirichlet", "num_clients": 3, "alpha": 0.5},
        },
        "federation": {"rounds": args.rounds, "clients_per_evaluation": 0},
        "training": {"batch_size": 16, "learning_rate": args.lr, "local_epochs": args.local_epochs, "threads": 2},
        "algorithm": {
            "temperature": 2.0,
            "learning_rate": args.lr,
            "epochs": 2,
            "public_data": {"held_out": 0.2},
            **algorithm,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    methods = {
        "FedAvg (3 x MiniLM)": {"kind": "ensemble_distillation"},  # its refinement switched off below
        "FedDF (3 x MiniLM)": {"kind": "ensemble_distillation"},
        "distillation (MiniLM, MiniLM-3L, MiniLM -> MiniLM)": {
            "kind": "distillation",
            "client_models": ["minilm", three_layer_minilm(), "minilm"],
        },
    }
    rows, local_only = [], []
    for name, algorithm in methods.items():
        data = config(args, algorithm)
        simulation = build_simulation(parse_config(data))
        server = simulation.server
        if name.startswith("FedAvg"):  # FedDF's split without its refinement step: plain FedAvg
            server.algorithm = WeightAveraging()
        history = server.fit(args.rounds, args.local_epochs, None, simulation.validation, 0)
        rows.append(
            {
                "method": name,
                "val_accuracy": history[-1]["val_accuracy"],
                "up_bytes_per_client_round": statistics.mean(r["bytes_up"] / r["clients"] for r in history),
                "down_bytes_per_client_round": statistics.mean(r["bytes_down"] / r["clients"] for r in history),
                "seconds_per_round": statistics.mean(r["seconds"] for r in history),
                "accuracy_by_round": [r["val_accuracy"] for r in history],
            }
        )
        if server.algorithm.replaces_weights:
            for client in server.clients:
                set_federated_vector(client.model, client.local_parameters)
                accuracy = evaluate_model(client.model, simulation.validation, 16, 0)["accuracy"]
                layers = client.model.config.num_hidden_layers
                local_only.append(
                    {"client": client.name, "layers": layers, "examples": len(client.data), "val_accuracy": accuracy}
                )
    table = Table(title=f"BBC News, Dirichlet(0.5) over 3 clients, {args.rounds} rounds, {args.examples} articles")
    for column in ("method", "val acc", "up / client / round", "down / client / round", "s / round"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(
            row["method"], f"{row['val_accuracy']:.3f}", f"{row['up_bytes_per_client_round'] / 1e6:.3f} MB",
            f"{row['down_bytes_per_client_round'] / 1e6:.3f} MB", f"{row['seconds_per_round']:.1f}",
        )  # fmt: skip
    for client in local_only:
        table.add_row(f"local only: {client['client']} ({client['layers']} layers, {client['examples']} examples)",
                      f"{client['val_accuracy']:.3f}", "0", "0", "")  # fmt: skip
    Console(width=160).print(table)
    out = RESULTS / "distillation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"methods": rows, "local_only": local_only}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
