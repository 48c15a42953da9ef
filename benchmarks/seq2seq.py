"""Sequence to sequence on the tiny T5 of examples/configs/seq2seq-tiny-t5.yaml: centralized
against FedAvg, validation perplexity and ROUGE-L of greedy samples per round.

No pretrained encoder-decoder ships in a PyPI package, so examples/seq2seq_tiny_t5.py writes the
inputs: `--pairs` of Chit Chat's opening messages and the replies they got, and a T5 of 2 + 2
layers (width 64) with a WordPiece tokenizer fitted to them, from random weights. The example
config then runs three ways on the same rows (its seed, validation split and test splits):
  - centralized: one client holding every training pair (the reference);
  - FedAvg, IID: the pairs shuffled over 4 clients;
  - FedAvg, non-IID: partition `clusters` (k-means over the initial model's mean-pooled
    embeddings, Dirichlet alpha 0.3 over 4 clusters).
Prints validation perplexity and sample ROUGE-L per round and seconds per round, and writes
benchmarks/results/seq2seq.json. Not a test: nothing asserts time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedlm.config import load_config
from fedlm.runtime import build_simulation, run_federation

ROOT = Path(__file__).parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fedlm-seq2seq-"))
    prepare = [sys.executable, str(ROOT / "examples" / "seq2seq_tiny_t5.py"), "--pairs", str(args.pairs)]
    subprocess.run(prepare, cwd=folder, check=True)
    example = load_config(ROOT / "examples" / "configs" / "seq2seq-tiny-t5.yaml")
    inputs = folder / "runs" / "seq2seq-tiny-t5-inputs"
    setups = {
        "centralized": {"kind": "iid", "num_clients": 1},
        "FedAvg IID (4 clients)": {"kind": "iid", "num_clients": 4},
        "FedAvg non-IID (4 clients, clusters)": {
            "kind": "clusters", "num_clients": 4, "clusters": 4, "alpha": 0.3, "encoder": str(inputs / "model"),
        },
    }  # fmt: skip
    results = {}
    for index, (name, partition) in enumerate(setups.items()):
        data = example.model_dump(mode="json")
        data["output_dir"] = str(folder / f"run-{index}")
        data["model"]["name"] = str(inputs / "model")
        data["data"].update({"dataset": str(inputs / "pairs.jsonl"), "partition": partition})
        data["federation"]["rounds"] = args.rounds
        config = type(example).model_validate(data)
        run_federation(build_simulation(config))
        metrics = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
        results[name] = [json.loads(line) for line in metrics]  # round 0 (before training) included
    table = Table(title=f"tiny T5 on {args.pairs} Chit Chat pairs: validation perplexity / sample ROUGE-L")
    table.add_column("round")
    for name in results:
        table.add_column(name, justify="right")
    for round_number in range(args.rounds + 1):
        cells = []
        for history in results.values():
            record = history[round_number]
            cells.append(f"{record['val_perplexity']:.1f} / {record.get('sample_rouge_l', 0.0):.3f}")
        table.add_row(str(round_number), *cells)
    table.add_row(
        "s per round", *[f"{sum(r.get('seconds', 0) for r in h) / args.rounds:.1f}" for h in results.values()]
    )
    Console(width=160).print(table)
    out = Path(__file__).parent / "results" / "seq2seq.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
