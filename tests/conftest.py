"""Shared fixtures: a tiny random-init BERT and tokenizer built offline, and synthetic topic data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

FIXTURES = Path(__file__).parent / "fixtures"
TOPIC_WORDS = {
    "business": "market shares company bank profit sales growth prices economy".split(),
    "sport": "game match team player win season coach goal cup".split(),
    "tech": "software computer phone internet users technology data network digital".split(),
}
# a fourth topic, for clients that know different topics; make_records draws from it only when asked
POLITICS_WORDS = "election vote government minister party policy law".split()
FILLER = "the a of to in and is was for on with as by at from it this that said new one year people time".split()


# `make test`'s workers (pytest-xdist, --dist loadscope --no-loadscope-reorder) take whole modules
# in collection order:
# the longest modules go first, so that none of them starts last and runs on after the rest is
# done (their durations are in BENCHMARKS.md). Within a module the order stays as written.
LONGEST_MODULES = (
    "test_deployment.py",
    "test_convergence.py",
    "test_real_model.py",
    "test_real_decoder.py",
    "test_resume.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_MODULES)))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A run config's `training.threads` sets torch's thread count for the whole process: put it
    back after each test, so that results never depend on which tests ran before."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_fedlm(*args: str, cwd: Path, timeout: int = 600):
    """Run the `fedlm` command as a user does, in `cwd`; returns the completed process."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "fedlm", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_folder: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]


def fail_in_round(server, names: set[str], round_number: int) -> None:
    """Make the named clients raise during training in `round_number`."""
    for client in server.clients:
        if client.name in names:
            honest = client.fit

            def fit(ins, honest=honest, name=client.name):
                if ins.config["round"] == round_number:
                    raise RuntimeError(f"{name} lost power")
                return honest(ins)

            client.fit = fit


def make_records(num: int, seed: int, labels: list[str] | None = None) -> list[dict]:
    """`num` short texts; each mixes filler words with three words of its topic (`labels`: the
    three of TOPIC_WORDS, or any of them and politics)."""
    rng = random.Random(seed)
    labels = labels or sorted(TOPIC_WORDS)
    topics = {**TOPIC_WORDS, "politics": POLITICS_WORDS}
    records = []
    for _ in range(num):
        label = rng.choice(labels)
        words = rng.sample(FILLER, 6) + rng.sample(topics[label], 3)
        rng.shuffle(words)
        records.append({"text": " ".join(words), "label": label})
    return records


def build_tiny_model_folder(folder: Path, hidden_size: int = 32, layers: int = 2) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    tokenizer = BertTokenizer(vocab=str(FIXTURES / "vocab.txt"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)  # an encoder without a head, like a pretrained checkpoint
    tokenizer.save_pretrained(folder)
    return folder


def tiny_fast_tokenizer():
    """A WordPiece tokenizer from tests/fixtures/vocab.txt with ChatML's markers as special tokens
    (<|im_end|> its end-of-sequence token) and ChatML as its chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fedlm.tasks.causal_lm import CHATML

    vocab = [line for line in (FIXTURES / "vocab.txt").read_text().splitlines() if line]
    core = Tokenizer(models.WordPiece({token: index for index, token in enumerate(vocab)}, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_llama_folder(folder: Path, layers: int = 2, hidden_size: int = 32) -> Path:
    """A tiny random-init Llama decoder of `layers` layers of width `hidden_size` and the tiny fast
    tokenizer (`tiny_fast_tokenizer`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_fast_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_t5_folder(folder: Path) -> Path:
    """A tiny random-init T5 encoder-decoder (2 + 2 layers, width 32) and the tiny fast tokenizer."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = tiny_fast_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_conversations(num: int, seed: int) -> list[dict]:
    """`num` two-turn chats: the user names a topic word, the assistant answers with the topic and
    three of its other words (a mapping a model can learn)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        topic = rng.choice(sorted(TOPIC_WORDS))
        asked = rng.choice(TOPIC_WORDS[topic])
        answer = " ".join([word for word in TOPIC_WORDS[topic] if word != asked][:3])
        rows.append({"messages": [
            {"role": "user", "content": f"tell me about the {asked}"},
            {"role": "assistant", "content": f"{topic} {answer}"},
        ]})  # fmt: skip
    return rows


ENTITY_WORDS = {
    "PER": (["alice", "bob", "carol", "dave"], ["smith", "jones"]),
    "LOC": (["paris", "london", "tokyo", "lima"], ["city"]),
    "ORG": (["acme", "globex", "initech"], ["company", "bank"]),
}


def make_tagged_sentences(num: int, seed: int) -> list[dict]:
    """`num` sentences of filler words with one or two entities each (a first word, and sometimes a
    second that continues it), as `tokens` and BIO `tags`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        tokens, tags = [], []
        for _ in range(rng.randint(1, 2)):
            words = rng.sample(FILLER, rng.randint(1, 3))
            tokens += words
            tags += ["O"] * len(words)
            kind = rng.choice(sorted(ENTITY_WORDS))
            first, rest = ENTITY_WORDS[kind]
            tokens.append(rng.choice(first))
            tags.append(f"B-{kind}")
            if rng.random() < 0.5:
                tokens.append(rng.choice(rest))
                tags.append(f"I-{kind}")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder holding a tiny random-init BERT encoder and its tokenizer, like a pretrained model."""
    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def load_tiny(tiny_model_dir):
    """Load the tiny model with `num_labels` (a fresh, seeded head)."""
    from fedlm.tasks.classification import load_classifier

    def load(num_labels: int = 3, seed: int = 0):
        return load_classifier(str(tiny_model_dir), num_labels=num_labels, seed=seed)

    return load


@pytest.fixture
def config_data_factory(tmp_path, tiny_model_dir):
    """Run-config dicts over a CSV of synthetic topics and the tiny model."""
    import csv

    path = tmp_path / "topics.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_records(400, seed=0))

    def make(num_clients: int = 4, rounds: int = 3, **sections) -> dict:
        data = {
            "seed": 3,
            "output_dir": str(tmp_path / "run"),
            "model": {"name": str(tiny_model_dir)},
            "data": {
                "dataset": str(path),
                "validation_fraction": 0.25,
                "partition": {"kind": "iid", "num_clients": num_clients},
            },
            "federation": {"rounds": rounds},
            "training": {"local_epochs": 2, "learning_rate": 3e-3, "max_length": 32},
        }
        for name, values in sections.items():
            data[name] = {**data.get(name, {}), **values}
        return data

    return make
