"""The inputs of examples/configs/seq2seq-tiny-t5.yaml: no pretrained encoder-decoder ships in a
PyPI package, so this writes Chit Chat's opening messages and the replies they got (pairs.jsonl,
source and target) and a small T5 to train from random weights on them (model/: a WordPiece
tokenizer fitted to the pairs, 2 + 2 layers), into runs/seq2seq-tiny-t5-inputs/. Then

    python examples/seq2seq_tiny_t5.py --pairs 2000
    fedlm run examples/configs/seq2seq-tiny-t5.yaml
"""

import argparse
import json
from pathlib import Path

import torch

from fedlm.data import load_bundled_dataset


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
    parser.add_argument("--vocabulary", type=int, default=2000)
    parser.add_argument("--inputs", type=Path, default=Path("runs/seq2seq-tiny-t5-inputs"))
    args = parser.parse_args()
    pairs = opening_pairs(args.pairs)
    args.inputs.mkdir(parents=True, exist_ok=True)
    (args.inputs / "pairs.jsonl").write_text("\n".join(json.dumps(pair) for pair in pairs))
    build_model(args.inputs / "model", pairs, args.vocabulary)
    print(f"wrote {args.inputs}/pairs.jsonl ({len(pairs)} pairs) and {args.inputs}/model")


if __name__ == "__main__":
    main()
