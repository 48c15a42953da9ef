"""FedProx and SCAFFOLD on the client side, deadlines, oversized replies, failing clients in a run."""

import logging
import time

import pytest
import torch

from conftest import make_records
from fedlm import FedClient, FedServer
from fedlm.client.local_training import ProximalTerm
from fedlm.core.params import ParamSpec
from fedlm.core.strategies import FedAvg, FedProx, Scaffold
from fedlm.errors import ClientError
from fedlm.protocol import FitIns, FitRes

FAST = {"learning_rate": 3e-3, "max_length": 32}


def test_proximal_gradient_by_hand():
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    param.grad = torch.tensor([0.1, 0.1])
    ProximalTerm(0.5, torch.tensor([0.0, 4.0]), ParamSpec(("w",), ((2,),))).adjust_gradients([param])
    assert torch.allclose(param.grad, torch.tensor([0.1 + 0.5, 0.1 - 1.0]))


def test_fedprox_keeps_clients_closer_to_the_global_model(load_tiny):
    def drift(mu):
        model = load_tiny()
        client = FedClient(make_records(120, seed=1), model, name="c", **FAST)
        start = client.get_parameters()
        result = client.fit(FitIns(start, {"round": 1, "epochs": 3, "proximal_mu": mu}))
        return float(result.delta.norm())

    assert drift(50.0) < 0.5 * drift(0.0)


def test_scaffold_client_control_variate_follows_option_two(load_tiny):
    model = load_tiny()
    client = FedClient(
        make_records(64, seed=1), model, name="c", optimizer="sgd", learning_rate=0.1, max_length=32, batch_size=16
    )
    x = client.get_parameters()
    server_control = torch.full_like(x, 0.01)
    result = client.fit(FitIns(x, {"round": 1, "epochs": 1, "scaffold": True}, {"server_control": server_control}))
    steps = result.metrics["steps"]
    # c_i starts at 0: c_i+ = 0 - c + (x - y) / (K lr), and the client sends c_i+ - c_i
    expected = -server_control - result.delta / (steps * 0.1)
    assert torch.allclose(result.extras["control_delta"], expected, atol=1e-6)
    assert torch.equal(client.control_variate, result.extras["control_delta"])


def test_scaffold_runs_end_to_end_and_moves_the_server_control(load_tiny):
    model = load_tiny()
    clients = [
        FedClient(make_records(80, seed=s), model, name=f"c{s}", optimizer="sgd", learning_rate=0.05, max_length=32)
        for s in range(3)
    ]
    server = FedServer(clients, Scaffold(num_clients=3))
    record = server.run_round()
    assert record["clients"] == 3 and not record["dropped"]
    assert server.strategy.server_control.abs().sum() > 0
    assert all(client.control_variate is not None for client in clients)


class Slow(FedClient):
    def fit(self, ins):
        time.sleep(0.6)
        return super().fit(ins)


class Oversized(FedClient):
    def fit(self, ins):
        result = super().fit(ins)
        return FitRes(
            result.delta,
            result.num_examples,
            result.metrics,
            {"padding": torch.zeros(3 * result.delta.numel() + 300_000)},
        )


def test_round_deadline_drops_late_and_unstarted_clients(load_tiny):
    model = load_tiny()
    clients = [
        FedClient(make_records(20, 0), model, name="a"),
        Slow(make_records(20, 1), model, name="slow"),
        FedClient(make_records(20, 2), model, name="c"),
    ]
    record = FedServer(clients, round_timeout=0.3).run_round()
    reasons = {item["client"]: item["reason"] for item in record["dropped"]}
    assert reasons["slow"].startswith("timed out") and reasons["c"].startswith("not started")
    assert record["clients"] == 1


def test_oversized_reply_is_refused_before_decoding(load_tiny):
    model = load_tiny()
    clients = [FedClient(make_records(20, 0), model, name="a"), Oversized(make_records(20, 1), model, name="big")]
    record = FedServer(clients).run_round()
    assert "exceeds the limit" in record["dropped"][0]["reason"] and record["clients"] == 1


def test_a_run_where_two_of_five_clients_crash_every_round(config_data_factory, caplog):
    from fedlm.config import parse_config
    from fedlm.runtime import build_simulation, run_federation

    simulation = build_simulation(parse_config(config_data_factory(num_clients=5, rounds=3)))
    for client in simulation.server.clients[1:3]:
        client.fit = lambda ins, name=client.name: (_ for _ in ()).throw(OSError(f"{name} lost its disk"))
    with caplog.at_level(logging.WARNING, logger="fedlm"):
        history = run_federation(simulation)
    assert [record["round"] for record in history] == [1, 2, 3]
    for record in history:
        assert record["clients"] == 3
        assert {item["client"]: item["reason"] for item in record["dropped"]} == {
            "client-1": "OSError: client-1 lost its disk",
            "client-2": "OSError: client-2 lost its disk",
        }
    assert "round 3: client client-2 dropped: OSError: client-2 lost its disk" in caplog.text
    assert history[-1]["val_accuracy"] > history[0]["val_accuracy"] - 0.05


def test_too_few_survivors_skip_the_round_and_keep_the_model(config_data_factory):
    from fedlm.config import parse_config
    from fedlm.runtime import build_simulation, run_federation

    data = config_data_factory(num_clients=3, rounds=2)
    data["federation"]["min_clients"] = 2
    simulation = build_simulation(parse_config(data))
    for client in simulation.server.clients[:2]:
        client.fit = lambda ins: (_ for _ in ()).throw(RuntimeError("out of memory"))
    before = simulation.server.global_params.clone()
    with pytest.raises(ClientError, match="no round aggregated"):
        run_federation(simulation)
    history = simulation.server.history
    assert len(history) == 2 and all(record.get("skipped") for record in history)
    assert torch.equal(simulation.server.global_params, before)


@pytest.mark.parametrize("strategy", [FedAvg(), FedProx(mu=0.01)])
def test_strategies_plug_into_the_seed_api(load_tiny, strategy):
    clients = [FedClient(make_records(60, seed=s), load_tiny(), name=f"c{s}", **FAST) for s in range(2)]
    server = FedServer(clients, strategy)
    for client in clients:
        client.local_train()
    server.aggregate_parameters()
    server.broadcast_model()
    assert clients[0]._instructions.config.get("proximal_mu") == getattr(strategy, "mu", None)


def test_the_server_sends_each_rounds_learning_rate_and_clients_train_with_it(config_data_factory, load_tiny):
    from fedlm.config import parse_config
    from fedlm.runtime import build_simulation

    data = config_data_factory(num_clients=2, rounds=3, training={"lr_schedule": "cosine", "local_epochs": 1})
    history = build_simulation(parse_config(data)).server.fit(rounds=3)
    # 0.5 * 3e-3 * (1 + cos(pi * (r - 1) / 3)) for rounds 1, 2, 3
    assert [record["learning_rate"] for record in history] == pytest.approx([3e-3, 2.25e-3, 7.5e-4])

    model = load_tiny()
    start = FedClient(make_records(20, 0), model, name="a").get_parameters().clone()
    instructions = {"round": 1, "epochs": 1, "seed": 0}
    scheduled = FedClient(make_records(20, 0), model, name="a", **FAST)
    delta = scheduled.fit(FitIns(start, {**instructions, "learning_rate": 7.5e-4})).delta
    given = FedClient(make_records(20, 0), model, name="a", **{**FAST, "learning_rate": 7.5e-4})
    assert torch.equal(delta, given.fit(FitIns(start, instructions)).delta)
    assert not torch.equal(delta, scheduled.fit(FitIns(start, instructions)).delta)  # FAST's 3e-3


def test_a_communication_budget_ends_the_run_cleanly_and_a_larger_one_resumes_it(config_data_factory, tmp_path):
    import json

    from fedlm.config import parse_config
    from fedlm.runtime import build_simulation, run_federation

    def run(budget, resume=False):
        data = config_data_factory(num_clients=2, rounds=3, federation={"max_total_bytes": budget})
        return run_federation(build_simulation(parse_config(data)), resume=resume)

    def summary():
        return json.loads((tmp_path / "run" / "summary.json").read_text())

    (first,) = run(1)  # round 1 always runs: nothing to estimate it from
    size = first["bytes_up"] + first["bytes_down"]
    assert summary()["stopped"].startswith("communication budget: round 2 would exceed federation.max_total_bytes 1 ")
    assert summary()["communication_budget"] == {"max_total_bytes": 1, "training_rounds_bytes": size}
    assert (tmp_path / "run" / "model").exists()
    # a larger budget on resume: room for one more round of that size, not two
    resumed = run(int(2.5 * size), resume=True)
    assert [record["round"] for record in resumed] == [1, 2]
    assert "round 3 would exceed federation.max_total_bytes" in summary()["stopped"]
    spent = sum(record["bytes_up"] + record["bytes_down"] for record in resumed)
    assert summary()["communication_budget"]["training_rounds_bytes"] == spent <= 2.5 * size
