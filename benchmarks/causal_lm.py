"""Dialogue tuning of the bundled SmolLM2-135M-Instruct on Chit Chat conversations, four ways.

The conversations of the `--clients` largest Chit Chat topics (`--per-client` of each to train on,
`--validation` more of each for the federated validation set, and a public set from other topics
for distillation) are run through:
  - centralized LoRA: one client holding every training conversation (the reference);
  - FedAvg LoRA, IID: the same conversations shuffled over the clients;
  - FedAvg LoRA, non-IID: one topic per client;
  - federated distillation of decoders: one topic per client, each fine-tuning its own decoder
    and sending its top-k next-token log-probabilities on the public set; the student learns.
Then the tokens per second of `FedClient.local_train` against a plain PyTorch/PEFT loop over the
same model and batches.

Prints tables and writes benchmarks/results/causal_lm.json. Not a test: nothing asserts time.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedlm import FedClient
from fedlm.config import parse_config
from fedlm.data import load_bundled_dataset
from fedlm.models import load_tokenizer
from fedlm.runtime import build_simulation, run_federation
from fedlm.runtime.assemble import peft_config
from fedlm.tasks import CausalLMTask
from fedlm.tasks.text import batches

LORA = {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"messages": row["messages"]}) + "\n" for row in rows))
    return path


def split_topics(args: argparse.Namespace, folder: Path) -> dict:
    """Per-topic client files, the IID reshuffle of the same rows, validation and public files."""
    rows = load_bundled_dataset("chitchat").rows
    topics = [topic for topic, _ in Counter(row["topic"] for row in rows).most_common() if topic != "(no prompt)"]
    chosen, rng = topics[: args.clients], random.Random(0)
    train, validation, by_topic = [], [], []
    for topic in chosen:
        of_topic = [row for row in rows if row["topic"] == topic]
        rng.shuffle(of_topic)
        by_topic.append(of_topic[: args.per_client])
        validation += of_topic[args.per_client : args.per_client + args.validation]
    train = [row for part in by_topic for row in part]
    public = [row for row in rows if row["topic"] not in chosen]
    rng.shuffle(public)
    shuffled = rng.sample(train, len(train))
    return {
        "topics": chosen,
        "non_iid": [write_rows(folder / f"topic-{i}.jsonl", part) for i, part in enumerate(by_topic)],
        "iid": [write_rows(folder / f"iid-{i}.jsonl", shuffled[i :: args.clients]) for i in range(args.clients)],
        "central": [write_rows(folder / "all.jsonl", train)],
        "validation": write_rows(folder / "validation.jsonl", validation),
        "public": write_rows(folder / "public.jsonl", public[: args.public]),
    }


def run(
    args: argparse.Namespace,
    folder: Path,
    name: str,
    clients: list[Path],
    files: dict,
    learning_rate: float,
    **sections,
) -> dict:
    config = {
        "seed": 0,
        "output_dir": str(folder / name),
        "model": {"name": "smollm2-135m"},
        "task": {"kind": "causal_lm", "samples": 1, "max_new_tokens": 32},
        "data": {
            "validation_file": str(files["validation"]),
            "client_test_fraction": 0.0,
            "partition": {"kind": "predefined", "clients": [str(path) for path in clients]},
        },
        "federation": {"rounds": args.rounds},
        "training": {
            "learning_rate": learning_rate, "max_length": args.max_length, "batch_size": args.batch_size,
            "threads": args.threads, "group_by_length": True,
        },
        **sections,
    }  # fmt: skip
    simulation = build_simulation(parse_config(config))
    history = run_federation(simulation)
    before = json.loads((folder / name / "metrics.jsonl").read_text().splitlines()[0])
    return {
        "perplexity": [before["val_perplexity"], *(record["val_perplexity"] for record in history)],
        "bytes_up_per_client": [record["bytes_up"] / record["clients"] for record in history],
        "bytes_down_per_client": [record["bytes_down"] / record["clients"] for record in history],
        "seconds": [record["seconds"] for record in history],
        "sample": history[-1].get("sample"),
    }


def plain_peft_seconds(model: torch.nn.Module, data, batch_size: int, learning_rate: float) -> float:
    """One epoch of the textbook loop (AdamW, clipping at 1) over the same batches, in order."""
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    model.train()
    start = time.perf_counter()
    for batch in batches(data, batch_size, 0, torch.randperm(len(data)).tolist()):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def throughput(args: argparse.Namespace, files: dict) -> dict:
    """Tokens per second of local training, fedlm against the plain loop, on one client's data."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from fedlm.config import LoraConfig
    from fedlm.models.registry import resolve_model_path

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m")), peft_config(LoraConfig(**LORA))
    )
    tokenizer = load_tokenizer("smollm2-135m")
    client = FedClient(str(files["central"][0]), model, tokenizer, name="bench", task=CausalLMTask(),
                       batch_size=args.batch_size, max_length=args.max_length, learning_rate=args.learning_rate)  # fmt: skip
    data = client.encoded()
    tokens = sum(len(ids) for ids in data.input_ids)
    client.local_train()  # warm-up
    fedlm, plain = [], []
    for _ in range(args.repeats):
        fedlm.append(tokens / client.local_train()["seconds"])
        plain.append(tokens / plain_peft_seconds(model, data, args.batch_size, args.learning_rate))
    return {"fedlm_tokens_per_second": sorted(fedlm)[len(fedlm) // 2],
            "plain_tokens_per_second": sorted(plain)[len(plain) // 2], "tokens_per_epoch": tokens}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-client", type=int, default=30, help="training conversations per client (topic)")
    parser.add_argument("--validation", type=int, default=8, help="validation conversations per topic")
    parser.add_argument("--public", type=int, default=40, help="public conversations for distillation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="LoRA's")
    parser.add_argument("--full-learning-rate", type=float, default=1e-4, help="distillation's whole decoders'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        files = split_topics(args, folder)
        results = {"settings": vars(args), "topics": files["topics"]}
        lora = args.learning_rate
        results["centralized LoRA"] = run(args, folder, "central", files["central"], files, lora, peft=LORA)
        results["FedAvg LoRA, IID"] = run(args, folder, "iid", files["iid"], files, lora, peft=LORA)
        results["FedAvg LoRA, non-IID (a topic per client)"] = run(
            args, folder, "non-iid", files["non_iid"], files, lora, peft=LORA
        )
        distillation = {"kind": "distillation", "public_data": {"dataset": str(files["public"])}, "top_k": 16,
                        "temperature": 1.0, "learning_rate": args.full_learning_rate, "batch_size": args.batch_size}  # fmt: skip
        results["distillation, non-IID (top-16)"] = run(
            args, folder, "distillation", files["non_iid"], files, args.full_learning_rate, algorithm=distillation
        )
        results["throughput"] = throughput(args, files)

    console = Console()
    table = Table(title=f"SmolLM2-135M-Instruct on Chit Chat: validation perplexity by round ({args.threads} threads)")
    for column in ("run", *(f"round {r}" for r in range(args.rounds + 1)), "up / client / round", "s / round"):
        table.add_column(column, justify="right")
    for name, result in results.items():
        if isinstance(result, dict) and "perplexity" in result:
            table.add_row(
                name, *(f"{p:.2f}" for p in result["perplexity"]),
                f"{sum(result['bytes_up_per_client']) / len(result['bytes_up_per_client']) / 1e3:,.0f} kB",
                f"{sum(result['seconds']) / len(result['seconds']):.0f}",
            )  # fmt: skip
    console.print(table)
    speed = results["throughput"]
    ratio = speed["fedlm_tokens_per_second"] / speed["plain_tokens_per_second"]
    console.print(
        f"local training: fedlm {speed['fedlm_tokens_per_second']:.0f} tokens/s, plain PyTorch/PEFT loop "
        f"{speed['plain_tokens_per_second']:.0f} tokens/s: {ratio:.1%} (target >= 95%)"
    )
    results["throughput"]["ratio"] = ratio
    out = Path(__file__).parent / "results" / "causal_lm.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
