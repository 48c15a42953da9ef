"""The seq2seq task on a tiny T5: reading and encoding source/target rows, the token-weighted
loss against a hand computation, and federated runs (all weights and LoRA) whose perplexity falls
and whose samples' ROUGE-L rises."""

import json
import math

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from conftest import build_tiny_t5_folder, make_conversations
from fedlm.config import parse_config
from fedlm.errors import DatasetError, ModelError
from fedlm.runtime import build_simulation, run_federation
from fedlm.tasks import Seq2SeqTask, task_of_model
from fedlm.tasks.text import batches


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    return build_tiny_t5_folder(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The topic chats as source (the question) and target (the answer's three topic words, which
    the tiny vocabulary holds whole; the topic's name it spells out letter by letter)."""
    rows = [
        {"source": row["messages"][0]["content"], "target": row["messages"][1]["content"].split(" ", 1)[1]}
        for row in make_conversations(240, seed=0)
    ]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def test_rows_are_read_checked_and_targets_end_with_end_of_sequence(tiny_t5_dir):
    task, tokenizer = Seq2SeqTask(), AutoTokenizer.from_pretrained(tiny_t5_dir)
    data = task.read([{"input": "tell me about the game", "output": "sport team win"}])
    assert data.texts == ["tell me about the game"] and data.labels == ["sport team win"]
    encoded = task.encode(tokenizer, data.texts, data.labels, max_length=16)
    assert encoded.labels[0] == [
        *tokenizer("sport team win", add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    cut = task.encode(tokenizer, data.texts, data.labels, max_length=3, owner="client a")
    assert len(cut.labels[0]) == 3 and cut.labels[0][-1] == tokenizer.eos_token_id
    assert cut.notes == ["client a: 1 of 1 targets are longer than training.max_length=3 tokens and were cut"]
    with pytest.raises(DatasetError, match=r"row 1: target must be non-empty text"):
        task.read([{"source": "a", "target": "b"}, {"source": "a", "target": " "}])
    with pytest.raises(DatasetError, match="needs `source` and `target` columns"):
        task.read([{"question": "a", "answer": "b"}])


def test_the_loss_is_the_mean_over_all_target_tokens(tiny_t5_dir, pairs):
    task, tokenizer = Seq2SeqTask(), AutoTokenizer.from_pretrained(tiny_t5_dir)
    data = task.read(pairs)
    encoded = task.encode(tokenizer, data.texts[:5], data.labels[:5], max_length=16)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    assert isinstance(task_of_model(model), Seq2SeqTask)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(encoded.input_ids, encoded.labels):  # one example at a time, by hand
            logits = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).logits[0]
            total -= float(torch.log_softmax(logits, -1)[range(len(labels)), labels].sum())
            tokens += len(labels)
    scores = task.evaluate(model, encoded, batch_size=2, pad_id=tokenizer.pad_token_id)
    assert scores["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert next(batches(encoded, 5, tokenizer.pad_token_id))["labels"].shape[1] == max(map(len, encoded.labels))


def simulate(model_dir, pairs, output_dir, rounds=3, **sections):
    config = {
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"name": str(model_dir)},
        "task": {"kind": "seq2seq", "samples": 8, "max_new_tokens": 8},
        "data": {
            "dataset": str(pairs),
            "validation_fraction": 0.2,
            "client_test_fraction": 0.2,
            "partition": {"kind": "iid", "num_clients": 3},
        },
        "federation": {"rounds": rounds},
        "training": {"learning_rate": 1e-2, "max_length": 16, "batch_size": 8},
        **sections,
    }
    return run_federation(build_simulation(parse_config(config)))


def test_federated_seq2seq_lowers_perplexity_and_its_samples_come_closer(tiny_t5_dir, pairs, tmp_path):
    history = simulate(tiny_t5_dir, pairs, tmp_path / "run")
    perplexity = [record["val_perplexity"] for record in history]
    assert all(later < earlier for earlier, later in zip(perplexity, perplexity[1:])), perplexity
    assert perplexity[-1] < perplexity[0] / 4, perplexity
    lines = [json.loads(line) for line in (tmp_path / "run" / "samples" / "round_3.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {"source", "reference", "response", "rouge_l"} <= set(lines[0])
    assert history[-1]["sample_rouge_l"] == pytest.approx(sum(line["rouge_l"] for line in lines) / 8)
    first = [json.loads(line) for line in (tmp_path / "run" / "samples" / "round_0.jsonl").read_text().splitlines()]
    assert history[-1]["sample_rouge_l"] > sum(line["rouge_l"] for line in first) / 8


def test_lora_trains_the_encoder_decoder_and_cut_targets_are_said_once(tiny_t5_dir, tmp_path, caplog):
    # whole answers as targets: the topic's name, spelled letter by letter, makes them longer than 8 tokens
    rows = [{"source": row["messages"][0]["content"], "target": row["messages"][1]["content"]}
            for row in make_conversations(240, seed=0)]  # fmt: skip
    long_pairs = tmp_path / "pairs.jsonl"
    long_pairs.write_text("\n".join(json.dumps(row) for row in rows))
    history = simulate(
        tiny_t5_dir, long_pairs, tmp_path / "run", rounds=2, task={"kind": "seq2seq", "samples": 0},
        peft={"method": "lora", "r": 4, "target_modules": ["q", "v"]}, training={"learning_rate": 3e-2,
        "max_length": 8, "batch_size": 8},
    )  # fmt: skip
    perplexity = [record["val_perplexity"] for record in history]
    assert perplexity[1] < perplexity[0], perplexity
    # each client encodes its data every round; what the maximum length cut is logged once per split
    cut = [record.getMessage() for record in caplog.records if "targets are longer than" in record.getMessage()]
    assert any(message.startswith("client client-0: ") for message in cut)
    assert len(cut) == len(set(cut)), cut


def test_a_model_that_is_not_an_encoder_decoder_is_refused(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(ModelError, match="task seq2seq needs an encoder-decoder language model"):
        Seq2SeqTask().check_model(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir), None, "client a")
