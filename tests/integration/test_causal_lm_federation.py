"""Federated dialogue tuning of the tiny Llama: `fedlm run`'s simulation with task causal_lm, full
fine-tuning and LoRA in each of its aggregation modes, and the seed API with the task inferred."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_tiny_llama_folder, make_conversations
from fedlm import FedClient, FedServer
from fedlm.config import parse_config
from fedlm.runtime import build_simulation, run_federation
from fedlm.runtime.assemble import build_model
from fedlm.tasks import CausalLMTask


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in make_conversations(240, seed=0)))
    return path


def simulate(tiny_llama_dir, chats, output_dir, rounds=3, **sections):
    config = {
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"name": str(tiny_llama_dir)},
        "task": {"kind": "causal_lm"},
        "data": {
            "dataset": str(chats),
            "validation_fraction": 0.2,
            "client_test_fraction": 0.2,
            "partition": {"kind": "iid", "num_clients": 3},
        },
        "federation": {"rounds": rounds},
        "training": {"learning_rate": 1e-2, "max_length": 64, "batch_size": 8, "threads": 1},
        "peft": None,  # all weights (a decoder's default is LoRA)
    }
    for name, values in sections.items():
        config[name] = {**(config.get(name) or {}), **values}
    return run_federation(build_simulation(parse_config(config)))


def test_federated_dialogue_tuning_lowers_validation_perplexity_every_round(tiny_llama_dir, chats, tmp_path):
    history = simulate(tiny_llama_dir, chats, tmp_path / "run", task={"rouge_l": True})
    perplexity = [record["val_perplexity"] for record in history]
    assert all(later < earlier for earlier, later in zip(perplexity, perplexity[1:])), perplexity
    assert perplexity[-1] < perplexity[0] / 4, perplexity
    last = history[-1]
    clients = [item["perplexity"] for item in last["client_test"]]
    assert last["client_perplexity_worst"] == max(clients)  # lower is better: the worst is the highest
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()

    # the same four validation prompts answered after every round (round 0: the initial model)
    samples = [
        [json.loads(line) for line in (tmp_path / "run" / "samples" / f"round_{n}.jsonl").read_text().splitlines()]
        for n in range(4)
    ]
    assert all(len(round_samples) == 4 for round_samples in samples)
    assert all(
        [s["messages"] for s in round_samples] == [s["messages"] for s in samples[0]] for round_samples in samples
    )
    assert samples[0][0]["messages"][-1]["role"] == "user"
    assert last["sample"] == samples[3][0]["response"]

    def overlap(round_samples):  # share of the reference words the responses contain
        words = [(set(s["reference"].split()), set(s["response"].split())) for s in round_samples]
        return sum(len(reference & response) / len(reference) for reference, response in words) / len(words)

    assert overlap(samples[0]) == 0 < overlap(samples[3]), [s["response"] for s in samples[3]]
    # each response's ROUGE-L, and the round's mean
    assert all(0 <= s["rouge_l"] <= 1 for round_samples in samples for s in round_samples)
    assert last["sample_rouge_l"] == pytest.approx(sum(s["rouge_l"] for s in samples[3]) / 4)
    assert 0 < last["sample_rouge_l"]


def test_packed_length_grouped_tuning_with_a_cosine_learning_rate_lowers_perplexity(tiny_llama_dir, chats, tmp_path):
    history = simulate(
        tiny_llama_dir, chats, tmp_path / "run", task={"packing": True, "samples": 0},
        training={"group_by_length": True, "lr_schedule": "cosine", "batch_size": 2},
    )  # fmt: skip
    perplexity = [record["val_perplexity"] for record in history]
    assert all(later < earlier for earlier, later in zip(perplexity, perplexity[1:])), perplexity
    assert perplexity[-1] < perplexity[0] / 2, perplexity
    assert history[0]["train_examples"] == 240 - 48 - 39  # every training conversation, packed or not
    assert [record["learning_rate"] for record in history] == pytest.approx([1e-2, 7.5e-3, 2.5e-3])
    assert not (tmp_path / "run" / "samples").exists()


def test_dp_sgd_trains_the_decoder_and_accounts_each_clients_epsilon(tiny_llama_dir, chats, tmp_path):
    """Opacus clips each conversation's gradient of the model's loss (the mean over the batch's
    response tokens): the guarantee is per conversation."""
    history = simulate(
        tiny_llama_dir, chats, tmp_path / "run", rounds=2, task={"samples": 0},
        training={"dp_sgd": {"noise_multiplier": 0.5, "clip_norm": 1.0}},
    )  # fmt: skip
    perplexity = [record["val_perplexity"] for record in history]
    assert perplexity[1] < perplexity[0], perplexity
    assert all(set(record["client_dp_sgd_epsilon"]) == {"client-0", "client-1", "client-2"} for record in history)
    assert 0 < history[0]["dp_sgd_epsilon_max"] < history[1]["dp_sgd_epsilon_max"]


@pytest.mark.parametrize("aggregation", ["fedit", "ffa", "svd", "stack"])
def test_lora_trains_the_decoder_in_every_aggregation_mode(tiny_llama_dir, chats, tmp_path, aggregation):
    """A random-init model's output distribution sits in its tied embeddings, which LoRA leaves
    alone, so the adapters learn slowly (full fine-tuning: 26 -> 3.4 in the same rounds)."""
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    history = simulate(
        tiny_llama_dir, chats, tmp_path / "run",
        peft={"method": "lora", "r": 8, "aggregation": aggregation, "target_modules": targets},
    )  # fmt: skip
    perplexity = [record["val_perplexity"] for record in history]
    assert all(later < earlier for earlier, later in zip(perplexity, perplexity[1:])), perplexity
    assert perplexity[-1] < perplexity[0] * 0.9, perplexity


def test_ia3_trains_the_decoder_with_peft_default_modules(tiny_llama_dir, chats, tmp_path):
    history = simulate(
        tiny_llama_dir, chats, tmp_path / "run", rounds=2, task={"samples": 0}, peft={"method": "ia3"},
        training={"learning_rate": 5e-2},
    )  # fmt: skip
    perplexity = [record["val_perplexity"] for record in history]
    assert perplexity[1] < perplexity[0], perplexity
    # only the rescaling vectors travel: the 2 layers' key and value outputs (16 each, one key-value
    # head) and down projection inputs (64), float32, and a header
    assert 4 * 2 * (16 + 16 + 64) < history[0]["client_bytes"]["client-0"]["up"] < 4 * 2 * (16 + 16 + 64) + 1024


def test_the_seed_api_infers_the_task_from_a_causal_lm(tiny_llama_dir, chats, tmp_path):
    rows = [json.loads(line) for line in chats.read_text().splitlines()]
    for index in range(2):
        (tmp_path / f"client{index}.jsonl").write_text("\n".join(json.dumps(row) for row in rows[index::3]))
    held_out = rows[2::3][:40]
    clients = [
        FedClient(
            dataset=str(tmp_path / f"client{index}.jsonl"),
            model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
            max_length=64,
            learning_rate=1e-2,
        )
        for index in range(2)
    ]
    assert all(isinstance(client.task, CausalLMTask) for client in clients)
    server = FedServer(clients)
    before = server.evaluate(held_out)["perplexity"]
    for _ in range(2):
        for client in server.clients:
            client.local_train(epochs=1)
        server.aggregate_parameters()
        server.broadcast_model()
    assert server.evaluate(held_out)["perplexity"] < before / 2
    assert type(server.get_model()).__name__ == "LlamaForCausalLM"


def test_gradient_checkpointing_keeps_the_update_and_bf16_autocast_comes_close(tiny_llama_dir, chats):
    import peft
    import torch

    from fedlm.errors import ConfigError

    rows = [json.loads(line) for line in chats.read_text().splitlines()[:48]]

    def update(adapter=None, **options):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        client = FedClient(rows, model, name="a", max_length=64, learning_rate=1e-2, peft=adapter, **options)
        start = client.get_parameters().clone()
        client.local_train()
        return client.get_parameters() - start

    for adapter in (None, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])):
        plain = update(adapter)
        assert torch.allclose(update(adapter, gradient_checkpointing=True), plain, rtol=1e-4, atol=1e-7)
    plain, bf16 = update(), update(mixed_precision="bf16")
    assert not torch.equal(bf16, plain) and torch.nn.functional.cosine_similarity(bf16, plain, dim=0) > 0.9
    with pytest.raises(ConfigError, match="mixed_precision fp16 needs a CUDA device"):
        FedClient(rows, AutoModelForCausalLM.from_pretrained(tiny_llama_dir), name="a", mixed_precision="fp16")


@pytest.fixture(scope="module")
def llama_64_dir(tmp_path_factory):
    """The tiny Llama 64 wide: bitsandbytes' CPU kernels quantize rows in blocks of 64."""
    return build_tiny_llama_folder(tmp_path_factory.mktemp("llama-64"), hidden_size=64)


@pytest.mark.parametrize("bits, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_lora_over_a_quantized_base_trains_and_only_the_adapter_travels(llama_64_dir, chats, tmp_path, bits, layer):
    config = {"model": {"name": str(llama_64_dir), "quantization": bits}, "task": {"kind": "causal_lm"}}
    config["peft"] = {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"]}
    model = build_model(parse_config(config), str(llama_64_dir), None)
    up = model.base_model.model.model.layers[0].mlp.up_proj
    assert type(up.base_layer).__name__ == layer and not up.base_layer.weight.requires_grad
    # the quantized base computes nearly what the full-precision one does, and not exactly
    ids = torch.tensor([list(range(5, 25))])
    full = AutoModelForCausalLM.from_pretrained(llama_64_dir)(input_ids=ids).logits
    with model.disable_adapter():
        quantized = model(input_ids=ids).logits
    error = float((quantized - full).norm() / full.norm())
    assert 0 < error < (0.15 if bits == "4bit" else 0.05), error

    history = simulate(
        llama_64_dir, chats, tmp_path / "run", rounds=2, task={"samples": 1, "max_new_tokens": 4},
        model={"quantization": bits}, peft=config["peft"], training={"learning_rate": 3e-2},
    )  # fmt: skip
    perplexity = [record["val_perplexity"] for record in history]
    assert perplexity[1] < perplexity[0], perplexity
    # the 2 layers' A (4 x in) and B (out x 4) of q (64 -> 64), v (64 -> 32) and up (64 -> 128), float32
    adapter = 4 * 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 128))
    assert adapter < history[0]["client_bytes"]["client-0"]["up"] < adapter + 2048
    saved = tmp_path / "run" / "model"  # the adapter: merging would round it into the base's bits
    assert (saved / "adapter_config.json").exists() and not (saved / "model.safetensors").exists()


def test_dp_sgd_trains_lora_over_a_4_bit_base(llama_64_dir, chats, tmp_path):
    """Opacus computes the per-example gradients of the adapters' plain linear layers; the frozen
    4-bit layers only pass gradients through."""
    history = simulate(
        llama_64_dir, chats, tmp_path / "run", rounds=2, task={"samples": 0}, model={"quantization": "4bit"},
        peft={"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        training={"learning_rate": 3e-2, "dp_sgd": {"noise_multiplier": 0.5, "clip_norm": 1.0}},
    )  # fmt: skip
    # the noise is drawn from the OS's randomness, unseeded: the adapters learn fast in round 1 (the
    # initial 183 -> about 157) and then slowly, with round 2 sometimes a little above round 1
    initial = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert initial["round"] == 0
    perplexity = [record["val_perplexity"] for record in history]
    assert max(perplexity) < 0.95 * initial["val_perplexity"], (initial["val_perplexity"], perplexity)
    assert 0 < history[0]["dp_sgd_epsilon_max"] < history[1]["dp_sgd_epsilon_max"]
