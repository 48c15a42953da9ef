"""Local training throughput and per-round framework overhead on the bundled model.

1. A client's `local_train` against a plain PyTorch loop over the same model, batches, max length
   and threads, alternating the two so both see the same machine state (target: >= 95%).
2. Two simulated FedAvg rounds of 4 clients (160 articles each by default, as in `fedlm demo`):
   round time minus local training and evaluation (target: < 5%).

Prints a table and writes benchmarks/results/local_training.json. Not a test: nothing asserts time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedlm import FedClient
from fedlm.config import parse_config
from fedlm.data import load_bundled_dataset
from fedlm.models import load_tokenizer
from fedlm.runtime import build_simulation
from fedlm.tasks.classification import load_classifier


def plain_pytorch_epoch(model, tokenizer, texts, labels, batch_size, max_length, lr) -> float:
    """The loop a user would write by hand; returns samples per second."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    targets = torch.tensor(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    start = time.perf_counter()
    for begin in range(0, len(texts), batch_size):
        end = begin + batch_size
        loss = model(
            input_ids=encoded["input_ids"][begin:end],
            attention_mask=encoded["attention_mask"][begin:end],
            labels=targets[begin:end],
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=160, help="training examples per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--round-examples", type=int, default=640, help="training examples per simulated round (4 clients)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_bundled_dataset("bbc-news")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: args.examples].tolist()
    subset = data.subset(order)
    label_ids = {name: index for index, name in enumerate(sorted(set(data.labels)))}
    labels = [label_ids[label] for label in subset.labels]
    tokenizer = load_tokenizer("minilm")
    model = load_classifier("minilm", num_labels=5, seed=0)
    client = FedClient(subset, model, tokenizer, name="bench", batch_size=args.batch_size, max_length=args.max_length)
    client.local_train(epochs=1)  # warm-up, and tokenization happens once here
    plain, fedlm = [], []
    for _ in range(args.repeats):
        plain.append(
            plain_pytorch_epoch(model, tokenizer, subset.texts, labels, args.batch_size, args.max_length, 5e-5)
        )
        fedlm.append(client.local_train(epochs=1)["samples_per_second"])

    config = parse_config(
        {
            "model": {"name": "minilm"},
            "data": {
                "dataset": "bbc-news",
                "max_examples": args.round_examples + 160,
                "validation_fraction": 160 / (args.round_examples + 160),
                "client_test_fraction": 0.0,
                "partition": {"kind": "iid", "num_clients": 4},
            },
            "federation": {"rounds": 1},
            "training": {"max_length": args.max_length, "batch_size": args.batch_size, "threads": args.threads},
        }
    )
    simulation = build_simulation(config)
    rounds = [simulation.server.run_round(validation=simulation.validation) for _ in range(2)]
    overhead = [r["overhead_seconds"] / r["seconds"] for r in rounds]

    results = {
        "threads": args.threads,
        "examples": args.examples,
        "round_examples": args.round_examples,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "plain_samples_per_second": statistics.median(plain),
        "fedlm_samples_per_second": statistics.median(fedlm),
        "throughput_ratio": statistics.median(fedlm) / statistics.median(plain),
        "round_seconds": [r["seconds"] for r in rounds],
        "round_train_seconds": [r["train_seconds"] for r in rounds],
        "round_eval_seconds": [r["eval_seconds"] for r in rounds],
        "round_overhead_share": overhead,
    }
    table = Table(
        title=f"all-MiniLM-L6-v2, BBC News, {args.threads} threads, batch {args.batch_size}, max length {args.max_length}"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("plain PyTorch loop (samples/s, median)", f"{results['plain_samples_per_second']:.2f}", "")
    table.add_row("FedClient.local_train (samples/s, median)", f"{results['fedlm_samples_per_second']:.2f}", "")
    table.add_row("local_train / plain loop", f"{results['throughput_ratio']:.1%}", ">= 95%")
    for index, record in enumerate(rounds, start=1):
        table.add_row(
            f"round {index}: overhead / round time",
            f"{overhead[index - 1]:.2%} of {record['seconds']:.1f} s",
            "< 5%",
        )
    Console().print(table)
    out = Path(__file__).parent / "results" / "local_training.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
