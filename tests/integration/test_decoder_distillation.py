"""Federated distillation of decoders on tiny Llamas: clients of two sizes send their top-k
next-token log-probabilities on a public set of conversations, the student learns from them."""

from __future__ import annotations

import json

import pytest

from conftest import build_tiny_llama_folder, make_conversations
from fedlm.config import parse_config
from fedlm.errors import ConfigError
from fedlm.protocol import FitRes
from fedlm.runtime import build_simulation, run_federation
from fedlm.tasks.distillation import TOP_K_TOKENS, target_positions


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("decoders")
    chats = root / "chats.jsonl"
    chats.write_text("\n".join(json.dumps(row) for row in make_conversations(240, seed=2)))
    return {"chats": chats, "two": tiny_llama_dir, "one": build_tiny_llama_folder(root / "one", layers=1)}


def config(setup, output_dir, rounds=3, **algorithm):
    return parse_config({
        "seed": 0, "output_dir": str(output_dir), "model": {"name": str(setup["two"])},
        "task": {"kind": "causal_lm", "samples": 0},
        "data": {"dataset": str(setup["chats"]), "validation_fraction": 0.2, "client_test_fraction": 0.1,
                 "partition": {"kind": "iid", "num_clients": 2}},
        "algorithm": {"kind": "distillation", "public_data": {"held_out": 0.25}, "top_k": 8, "temperature": 1.0,
                      "learning_rate": 1e-2, "epochs": 2, "batch_size": 8,
                      "client_models": [str(setup["two"]), str(setup["one"])], **algorithm},
        "federation": {"rounds": rounds},
        "training": {"learning_rate": 1e-2, "max_length": 64, "batch_size": 8, "threads": 1},
    })  # fmt: skip


def test_a_student_decoder_learns_from_the_top_k_of_clients_of_two_sizes(setup, tmp_path):
    simulation = build_simulation(config(setup, tmp_path / "run"))
    sizes = {client.name: sum(p.numel() for p in client.model.parameters()) for client in simulation.server.clients}
    assert len(set(sizes.values())) == 2  # a 2-layer and a 1-layer decoder
    history = run_federation(simulation)
    perplexity = [record["val_perplexity"] for record in history]
    assert all(later < earlier for earlier, later in zip(perplexity, perplexity[1:])), perplexity
    assert perplexity[-1] < perplexity[0] / 2, perplexity
    # each client sends positions x k log-probabilities and as many token ids (float32 each)
    positions = target_positions(simulation.server.algorithm.encoded(simulation.server.global_model))
    for record in history:
        for moved in record["client_bytes"].values():
            assert 2 * positions * 8 * 4 <= moved["up"] < 2 * positions * 8 * 4 * 1.01 + 4096
        assert 8 <= record["soft_target_tokens"] <= 16 and record["student_loss"] > 0
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_a_reply_that_is_not_top_k_log_probabilities_drops_its_client(setup, tmp_path):
    simulation = build_simulation(config(setup, tmp_path / "run", rounds=1))
    honest = simulation.server.clients[0].fit

    def lying(ins):
        reply = honest(ins)
        return FitRes(reply.delta.abs() + 1, reply.num_examples, reply.metrics, reply.extras)  # "log-probabilities" > 0

    def out_of_vocabulary(ins):
        reply = honest(ins)
        return FitRes(reply.delta, reply.num_examples, reply.metrics, {TOP_K_TOKENS: reply.extras[TOP_K_TOKENS] + 1e6})

    for liar, expected in ((lying, "not log-probabilities"), (out_of_vocabulary, "not token ids in [0, ")):
        simulation.server.clients[0].fit = liar
        record = simulation.server.run_round()
        assert [item["client"] for item in record["dropped"]] == [simulation.server.clients[0].name]
        assert expected in record["dropped"][0]["reason"] and record["clients"] == 1


def test_decoders_with_another_vocabulary_and_options_made_for_classes_are_refused(setup, tmp_path):
    from transformers import AutoTokenizer

    other = build_tiny_llama_folder(tmp_path / "other", layers=1)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["federated"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"client client-1: its tokenizer's vocabulary .* is not the student's"):
        build_simulation(config(setup, tmp_path / "run", client_models=[str(setup["two"]), str(other)]))
    with pytest.raises(
        ConfigError, match=r"does not take client_output: probabilities .*; digest_epochs > 0.*; soft_labels_cover"
    ):
        config(setup, tmp_path / "run", client_output="probabilities", digest_epochs=1, soft_labels_cover="own_labels")
