"""Multi-domain distillation: two experts on different topic sets distil into one student that
knows every topic, on the bundled model (all-MiniLM-L6-v2) and BBC News.

`--articles` BBC News articles (seed 0) are split three ways: 20% the federated validation set
(every topic: the union of the experts' validation sets), 20% of the rest the public set (its
labels unused), and the rest dealt to two experts by topic: the business desk gets business,
entertainment and politics, the sports-and-tech desk politics, sports and tech (politics, the one
topic both know, alternates between them). Each expert is a client with its own MiniLM. Methods,
on the same clients, rounds and local epochs:
  - distillation, soft labels over own labels: each expert's soft labels restricted to its three
    topics, the student (over all five) matched to each over those only (`soft_labels_cover:
    own_labels`, `fedlm.core.distillation.MaskedSoftLabels`);
  - distillation, soft labels over all labels: the experts' full distributions averaged (the
    default, made for clients that share one label set);
  - FedAvg of the experts' weights (one model, for reference: it needs the same architecture
    everywhere and sends the whole model);
  - each expert alone (its own model after the distillation run), on the same validation set.
Prints a table (validation accuracy overall and on each expert's own topics, bytes up per client
per round) and writes benchmarks/results/expert_distillation.json. Not a test: nothing asserts time.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedlm.config import parse_config
from fedlm.data import load_bundled_dataset
from fedlm.models.federated import set_federated_vector
from fedlm.runtime import build_simulation
from fedlm.tasks.classification import evaluate_model
from fedlm.tasks.text import EncodedDataset

RESULTS = Path(__file__).parent / "results"
DESKS = {
    "business-desk": ("business", "entertainment", "politics"),
    "sports-tech-desk": ("politics", "sports", "tech"),
}


def write_split(folder: Path, articles: int) -> dict[str, Path]:
    """The validation, public and expert files (CSV) of `articles` shuffled BBC News articles."""
    data = load_bundled_dataset("bbc-news")
    rows = [{"text": text, "label": label} for text, label in zip(data.texts, data.labels)]
    random.Random(0).shuffle(rows)
    rows = rows[:articles]
    validation, rest = rows[: articles // 5], rows[articles // 5 :]
    public, training = rest[: len(rest) // 5], rest[len(rest) // 5 :]
    experts: dict[str, list[dict]] = {name: [] for name in DESKS}
    shared = 0
    for row in training:
        owners = [name for name, topics in DESKS.items() if row["label"] in topics]
        if len(owners) > 1:
            owners, shared = [owners[shared % len(owners)]], shared + 1
        experts[owners[0]].append(row)
    files = {"validation": validation, "public": [{"text": row["text"]} for row in public], **experts}
    paths = {}
    for name, contents in files.items():
        paths[name] = folder / f"{name}.csv"
        with paths[name].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, list(contents[0]))
            writer.writeheader()
            writer.writerows(contents)
    return paths


def config(args: argparse.Namespace, paths: dict[str, Path], algorithm: dict | None) -> dict:
    data = {
        "seed": 0,
        "model": {"name": "minilm"},
        "data": {
            "validation_file": str(paths["validation"]),
            "client_test_fraction": 0.0,
            "partition": {"kind": "predefined", "clients": [str(paths[name]) for name in DESKS]},
        },
        "federation": {"rounds": args.rounds, "clients_per_evaluation": 0},
        "training": {"batch_size": 16, "learning_rate": args.lr, "local_epochs": args.local_epochs, "threads": 2},
    }
    if algorithm is not None:
        data["algorithm"] = {
            "kind": "distillation", "temperature": 2.0, "learning_rate": args.lr, "epochs": 2,
            "public_data": {"dataset": str(paths["public"])}, **algorithm,
        }  # fmt: skip
    return data


def accuracies(model, validation, topics_of: dict[str, tuple[str, ...]], label2id: dict[str, int]) -> dict:
    """Accuracy on the whole validation set and on the articles of each desk's topics."""
    result = {"all": evaluate_model(model, validation, 16, 0)["accuracy"]}
    for desk, topics in topics_of.items():
        ids = {label2id[topic] for topic in topics}
        rows = [row for row, label in enumerate(validation.labels) if label in ids]
        subset = EncodedDataset([validation.input_ids[row] for row in rows], [validation.labels[row] for row in rows])
        result[desk] = evaluate_model(model, subset, 16, 0)["accuracy"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    methods = {
        "distillation, soft labels over own labels": {"soft_labels_cover": "own_labels"},
        "distillation, soft labels over all labels": {"soft_labels_cover": "all"},
        "FedAvg of the experts' weights": None,
    }
    rows, experts = [], []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_split(Path(folder), args.articles)
        for name, algorithm in methods.items():
            simulation = build_simulation(parse_config(config(args, paths, algorithm)))
            server, validation = simulation.server, simulation.validation
            history = server.fit(args.rounds, args.local_epochs, None, validation, 0)
            label2id = server.global_model.metadata.label2id
            rows.append({
                "method": name,
                "accuracy": accuracies(server.get_model(), validation, DESKS, label2id),
                "accuracy_by_round": [record["val_accuracy"] for record in history],
                "up_bytes_per_client_round": statistics.mean(r["bytes_up"] / r["clients"] for r in history),
                "seconds_per_round": statistics.mean(r["seconds"] for r in history),
            })  # fmt: skip
            if algorithm is not None and not experts:
                for client in server.clients:
                    set_federated_vector(client.model, client.local_parameters)
                    experts.append({
                        "method": f"{client.name} alone ({len(client.data)} articles)",
                        "accuracy": accuracies(client.model, validation, DESKS, label2id),
                    })  # fmt: skip
    table = Table(title=f"BBC News, two topic experts, {args.rounds} rounds, {args.articles} articles")
    for column in ("method", "val acc (all 5 topics)", *(f"{desk}'s topics" for desk in DESKS), "up / client / round"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows + experts:
        up = row.get("up_bytes_per_client_round")
        table.add_row(
            row["method"], *(f"{row['accuracy'][key]:.3f}" for key in ("all", *DESKS)),
            "" if up is None else f"{up / 1e6:.3f} MB",
        )  # fmt: skip
    Console(width=160).print(table)
    out = RESULTS / "expert_distillation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"methods": rows, "experts": experts}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
