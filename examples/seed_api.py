"""The seed API on real data: two clients carved from BBC News (a CSV and a JSONL file),
all-MiniLM-L6-v2, FedAvg for a few rounds, then accuracy on held-out articles.

    python examples/seed_api.py --rounds 3
"""

import argparse
import csv
import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from fedlm import FedClient, FedServer
from fedlm.data import load_bundled_dataset
from fedlm.models import resolve_model_path


def carve_clients(folder: Path, per_client: int, held_out: int) -> list[dict]:
    """Write data/client1.csv and data/client2.jsonl; return disjoint held-out records."""
    data = load_bundled_dataset("bbc-news")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    records = [{"text": data.texts[i], "label": data.labels[i]} for i in order]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "client1.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(records[:per_client])
    (folder / "client2.jsonl").write_text("\n".join(json.dumps(r) for r in records[per_client : 2 * per_client]))
    return records[2 * per_client : 2 * per_client + held_out]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--per-client", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    held_out = carve_clients(args.data_dir, args.per_client, args.held_out)
    path = resolve_model_path("minilm")
    options = {"max_length": args.max_length, "learning_rate": 1e-4}

    client1 = FedClient(
        dataset=str(args.data_dir / "client1.csv"),
        model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=5),
        **options,
    )
    client2 = FedClient(
        dataset=str(args.data_dir / "client2.jsonl"),
        model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=5),
        **options,
    )
    clients = [client1, client2]
    server = FedServer(clients)
    print(json.dumps({"round": 0, "held_out_accuracy": server.evaluate(held_out)["accuracy"]}), flush=True)
    for rnd in range(args.rounds):
        for client in clients:
            client.local_train(epochs=1)
        server.aggregate_parameters()
        server.broadcast_model()
        print(json.dumps({"round": rnd + 1, "held_out_accuracy": server.evaluate(held_out)["accuracy"]}), flush=True)
    fed_model = server.get_model()
    print(f"federated model: {type(fed_model).__name__} with labels {fed_model.config.id2label}")


if __name__ == "__main__":
    main()
