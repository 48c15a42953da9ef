"""Task seq2seq on a T5 built here: no pretrained encoder-decoder ships in a PyPI package, so this
trains a small T5 from random weights (a WordPiece tokenizer fitted to the data, 2 + 2 layers) to
answer Chit Chat's opening messages with the replies they got, federated over 4 clients. It shows
the task's machinery (teacher-forced loss, perplexity, greedy samples scored with ROUGE-L in
OUTPUT/samples/), not a useful model: for that, give a local T5 or BART folder as model.name.

    python examples/seq2seq_tiny_t5.py --pairs 2000 --rounds 5
"""

import argparse
import json
from pathlib import Path

import torch

from fedlm.config import parse_config
from fedlm.data import load_bundled_dataset
from fedlm.runtime import build_simulation, run_federation


def opening_pairs(count: int) -> list[dict]:
    """Each conversation's first message and the reply to it, as source and target."""
    rows = load_bundled_dataset("chitchat").rows[:count]
    return [{"source": row["messages"][0]["content"], "target": row["messages"][1]["content"]} for row in rows]


def build_model(folder: Path, pairs: list[dict], vocabulary: int) -> None:
    """A WordPiece tokenizer fitted to the pairs and a small random-init T5, saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    texts = [text for pair in pairs for text in (pair["source"], pair["target"])]
    core.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocabulary, special_tokens=["[PAD]", "[UNK]", "</s>"])
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
    config = T5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=32, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vocabulary", type=int, default=2000)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/seq2seq-tiny-t5"))
    args = parser.parse_args()
    pairs = opening_pairs(args.pairs)
    work = args.output_dir.parent / f"{args.output_dir.name}-inputs"
    work.mkdir(parents=True, exist_ok=True)
    (work / "pairs.jsonl").write_text("\n".join(json.dumps(pair) for pair in pairs))
    build_model(work / "model", pairs, args.vocabulary)
    config = parse_config({
        "seed": 0, "output_dir": str(args.output_dir), "model": {"name": str(work / "model")},
        "task": {"kind": "seq2seq", "samples": 8, "max_new_tokens": 16},
        "data": {"dataset": str(work / "pairs.jsonl"), "validation_fraction": 0.1, "client_test_fraction": 0.1,
                 "partition": {"kind": "iid", "num_clients": 4}},
        "federation": {"rounds": args.rounds},
        "training": {"learning_rate": 3e-3, "max_length": 48, "batch_size": 16},
    })  # fmt: skip
    for record in run_federation(build_simulation(config)):
        print(json.dumps({key: record[key] for key in ("round", "val_perplexity", "sample_rouge_l")}))


if __name__ == "__main__":
    main()
