"""PEFT adapters: only the adapter and the head are federated, the base never moves, exports reload."""

from __future__ import annotations

import peft
import pytest
import torch

from conftest import make_records
from fedlm import FedClient, FedServer
from fedlm.config import parse_config
from fedlm.core.strategies import Scaffold
from fedlm.errors import ConfigError, ModelError
from fedlm.runtime import build_simulation, run_federation


def lora_config(**options) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **options)


def test_lora_federates_only_the_adapter_and_the_head_and_the_base_never_changes(load_tiny):
    model = load_tiny(3)
    full = sum(p.numel() for p in model.parameters())
    clients = [
        FedClient(make_records(48, seed=i), model, name=f"c{i}", peft=lora_config(target_modules=["query", "value"]),
                  learning_rate=3e-3, max_length=32)
        for i in range(2)
    ]  # fmt: skip
    assert clients[0].model is clients[1].model  # one shared base, wrapped once
    server = FedServer(clients)
    assert all(".lora_" in name or ".classifier." in name for name in server.global_model.spec.names)
    assert server.global_model.spec.numel < full / 10
    frozen = {name: p.clone() for name, p in clients[0].model.named_parameters() if not p.requires_grad}
    before = server.global_params.clone()
    history = server.fit(rounds=2)
    assert not torch.equal(server.global_params, before)
    assert (
        history[-1]["bytes_up"] < 2 * 4 * server.global_model.spec.numel + 10_000
    )  # two clients' adapters, not the model
    errors = history[-1]["lora_aggregation_error"]  # FedIT: averaging A and B separately is inexact
    assert set(errors) == {
        f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")
    } | {"overall"}
    assert 0 < errors["overall"] < 1
    after = dict(clients[0].model.named_parameters())
    assert len(frozen) > 20 and all(torch.equal(after[name], value) for name, value in frozen.items())


def test_lora_target_modules_that_do_not_exist_name_the_ones_that_do(load_tiny):
    with pytest.raises(ModelError, match=r"\['q_proj'\] are not in the bert model; its linear layers are \[.*'query'"):
        FedClient(make_records(8, seed=0), load_tiny(3), peft=lora_config(target_modules=["q_proj"]))


@pytest.mark.parametrize(
    ("adapter", "trainable_marker"),
    [({"method": "ia3"}, ".ia3_l."), ({"method": "prompt_tuning", "num_virtual_tokens": 4}, "prompt_encoder")],
)
def test_ia3_and_prompt_tuning_run_from_config(config_data_factory, adapter, trainable_marker):
    config = parse_config(config_data_factory(num_clients=2, rounds=1, peft=adapter))
    simulation = build_simulation(config)
    names = simulation.server.global_model.spec.names
    assert any(trainable_marker in name for name in names) and all(
        trainable_marker in name or "classifier" in name for name in names
    )
    record = simulation.server.fit(rounds=1)[0]
    assert record["clients"] == 2 and torch.isfinite(torch.tensor(record["train_loss"]))


def test_ffa_keeps_every_lora_a_at_its_shared_initialisation(config_data_factory):
    config = parse_config(config_data_factory(num_clients=3, rounds=1, peft={"method": "lora", "aggregation": "ffa"}))
    simulation = build_simulation(config)
    model = simulation.server.clients[0].model
    a_before = {name: p.clone() for name, p in model.named_parameters() if ".lora_A." in name}
    assert a_before and not any(".lora_A." in name for name in simulation.server.global_model.spec.names)
    simulation.server.fit(rounds=1)
    assert all(torch.equal(dict(model.named_parameters())[name], value) for name, value in a_before.items())


def test_merged_and_adapter_exports_reload_and_predict_the_same(config_data_factory, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    config = parse_config(config_data_factory(num_clients=2, rounds=1, peft={"method": "lora", "r": 4}))
    simulation = build_simulation(config)
    run_federation(simulation)
    server = simulation.server
    global_model = server.get_model().eval()
    merged = AutoModelForSequenceClassification.from_pretrained(server.save(tmp_path / "merged")).eval()
    adapter_folder = server.save(tmp_path / "adapter", merge_lora=False)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=server.global_model.metadata.num_labels
    )
    unmerged = peft.PeftModel.from_pretrained(base, adapter_folder).eval()
    batch = server.global_model.tokenizer(
        ["market shares company", "game match team"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        expected = global_model(**batch).logits
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-5)
        assert torch.allclose(unmerged(**batch).logits, expected, atol=1e-6)
    assert not any("lora" in key for key in merged.state_dict())
    assert (adapter_folder / "adapter_config.json").exists()


def test_svd_aggregation_leaves_less_error_than_averaging_factors(config_data_factory):
    def first_round_error(aggregation: str) -> float:
        peft_settings = {"method": "lora", "r": 2, "aggregation": aggregation}
        simulation = build_simulation(parse_config(config_data_factory(num_clients=3, rounds=1, peft=peft_settings)))
        return simulation.server.fit(rounds=1)[0]["lora_aggregation_error"]["overall"]

    fedit, svd = first_round_error("fedit"), first_round_error("svd")
    assert 0 <= svd < fedit


def test_an_adapter_on_the_wrong_base_model_is_a_clear_error(config_data_factory, tmp_path):
    from conftest import build_tiny_model_folder
    from fedlm.models.adapters import load_adapter
    from fedlm.tasks.classification import load_classifier

    simulation = build_simulation(
        parse_config(config_data_factory(num_clients=2, rounds=1, peft={"method": "lora", "r": 4}))
    )
    folder = simulation.server.save(tmp_path / "adapter", merge_lora=False)
    other_base = load_classifier(str(build_tiny_model_folder(tmp_path / "wider", hidden_size=64)), num_labels=3, seed=0)
    with pytest.raises(ModelError, match=r"adapter in .*adapter does not fit the bert base model .*wider"):
        load_adapter(other_base, folder)
    with pytest.raises(ModelError, match="no PEFT adapter"):
        load_adapter(other_base, tmp_path)


def ranked_clients(load_tiny, ranks, **options) -> list[FedClient]:
    """One client per rank, each with its own model (PEFT injects adapters in place)."""
    return [
        FedClient(make_records(24 + 8 * index, seed=index), load_tiny(3), name=f"r{rank}", learning_rate=1e-2,
                  max_length=32, peft=peft.LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=["query", "value"]), **options)
        for index, rank in enumerate(ranks)
    ]  # fmt: skip


def lora_products(model) -> dict[str, torch.Tensor]:
    """s B A of every LoRA layer, by layer name, in float64."""
    return {
        name: module.scaling["default"]
        * (module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double())
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }


def effective_weights(model) -> dict[str, torch.Tensor]:
    """W + s B A of every LoRA layer: what the layer computes with."""
    products = lora_products(model)
    modules = dict(model.named_modules())
    return {name: modules[name].base_layer.weight.double() + product for name, product in products.items()}


@pytest.mark.parametrize("mode", ["stack", "svd"])
def test_clients_of_ranks_4_8_16_aggregate_as_the_dense_reference_says(load_tiny, mode):
    """After one round, each adapted layer of the global model computes with W + the exact
    example-weighted average of the clients' s_k B_k A_k (stack), or W + its best rank-16
    approximation (svd, Eckart-Young: the truncated SVD of the dense average); the reported
    aggregation error is that truncation's relative error."""
    clients = ranked_clients(load_tiny, (4, 8, 16))
    server = FedServer(clients, lora_aggregation=mode)
    before = effective_weights(server.get_model())
    record = server.fit(rounds=1)[0]
    total = sum(len(client.data) for client in clients)
    client_products = [lora_products(client.model) for client in clients]  # their trained factors
    after = effective_weights(server.get_model())
    layers = sorted(before)
    assert len(layers) == 4 and set(record["lora_aggregation_error"]) == {*layers, "overall"}
    for layer in layers:
        exact = sum(len(c.data) / total * products[layer] for c, products in zip(clients, client_products))
        if mode == "stack":
            assert torch.allclose(after[layer] - before[layer], exact, atol=1e-6)
            assert record["lora_aggregation_error"][layer] < 1e-4
        else:
            left, values, right = torch.linalg.svd(exact)
            truncated = left[:, :16] @ torch.diag(values[:16]) @ right[:16]
            assert torch.allclose(after[layer] - before[layer], truncated, atol=1e-6)
            truncation_error = float((exact - truncated).norm() / exact.norm())
            assert 0 < truncation_error == pytest.approx(record["lora_aggregation_error"][layer], rel=1e-4)
    head = sum(
        len(c.data)
        / total
        * dict(c.model.named_parameters())["base_model.model.classifier.modules_to_save.default.weight"]
        for c in clients
    )
    assert torch.allclose(
        dict(server.get_model().named_parameters())["base_model.model.classifier.modules_to_save.default.weight"],
        head,
        atol=1e-6,
    )


def test_a_lower_rank_client_receives_the_best_approximation_of_its_rank(load_tiny):
    clients = ranked_clients(load_tiny, (4, 16))
    server = FedServer(clients, lora_aggregation="svd")
    server.fit(rounds=1)
    server.broadcast_model()
    global_products = lora_products(server.get_model())
    for layer, product in lora_products(clients[0].model).items():  # rank 4, scaling 16/4
        left, values, right = torch.linalg.svd(global_products[layer])
        assert torch.allclose(product, left[:, :4] @ torch.diag(values[:4]) @ right[:4], atol=1e-6)


def test_stack_clients_receive_the_folded_base_and_a_fresh_adapter(load_tiny, tmp_path):
    clients = ranked_clients(load_tiny, (4, 8))
    server = FedServer(clients, lora_aggregation="stack")
    server.fit(rounds=1)
    server.broadcast_model()
    global_weights = effective_weights(server.get_model())
    for client in clients:
        assert all(float(product.abs().max()) == 0 for product in lora_products(client.model).values())  # B = 0
        for layer, weight in effective_weights(client.model).items():
            assert torch.allclose(weight, global_weights[layer], atol=1e-6)
    with pytest.raises(ConfigError, match="merge_lora=True"):
        server.save(tmp_path / "adapter", merge_lora=False)


def test_clients_with_different_lora_ranks_are_a_clear_error_where_the_mode_needs_equal_ranks(load_tiny):
    for mode in ("fedit", "ffa"):
        with pytest.raises(
            ModelError,
            match=rf"client r8: its LoRA adapter differs from client r4's: .*{mode} needs every client to use the same rank",
        ):
            FedServer(ranked_clients(load_tiny, (4, 8)), lora_aggregation=mode)
    with pytest.raises(ConfigError, match="Scaffold sends per-parameter state"):
        FedServer(
            ranked_clients(load_tiny, (4, 8), optimizer="sgd"), Scaffold(num_clients=2), lora_aggregation="svd"
        ).fit(rounds=1)


def test_client_ranks_from_config_run_and_are_checked(config_data_factory):
    lora = {"method": "lora", "r": 8, "client_ranks": [4, 8], "aggregation": "svd"}
    simulation = build_simulation(parse_config(config_data_factory(num_clients=3, rounds=1, peft=lora)))
    server = simulation.server
    assert sorted(server.global_model.layouts) == ["client-0", "client-2"]  # ranks 4, 8, 4; the global rank is 8
    record = server.fit(rounds=1)[0]
    assert record["clients"] == 3 and 0 < record["lora_aggregation_error"]["overall"] < 1
    with pytest.raises(ConfigError, match="client_ranks needs aggregation stack or svd"):
        parse_config(config_data_factory(peft={**lora, "aggregation": "fedit"}))
    with pytest.raises(ConfigError, match=r"r \(the global rank, 16\) must be the largest of client_ranks"):
        parse_config(config_data_factory(peft={**lora, "r": 16}))
