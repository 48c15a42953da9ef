"""Compressed communication in a run: measured bytes shrink, error feedback learns where top-k alone stalls."""

from __future__ import annotations

import torch

from fedlm.checkpoint import load_checkpoint, save_checkpoint
from fedlm.config import parse_config
from fedlm.runtime import build_simulation


def run(config_data_factory, rounds: int, **communication):
    data = config_data_factory(
        num_clients=3, rounds=rounds, communication=communication, federation={"clients_per_evaluation": 0}
    )
    simulation = build_simulation(parse_config(data))
    history = simulation.server.fit(rounds, 2, None, simulation.validation, 0)
    return simulation, history


def test_int8_and_float16_uploads_are_measured_smaller_and_still_learn(config_data_factory):
    _, plain = run(config_data_factory, 2)
    _, half = run(config_data_factory, 2, upload={"kind": "float16"})
    _, int8 = run(config_data_factory, 2, upload={"kind": "int8", "block": 256})
    assert 0.45 < half[-1]["bytes_up"] / plain[-1]["bytes_up"] < 0.55
    assert 0.2 < int8[-1]["bytes_up"] / plain[-1]["bytes_up"] < 0.3
    assert (
        abs(int8[-1]["bytes_down"] - plain[-1]["bytes_down"]) < 1000
    )  # downloads not compressed (the header names the codec)
    assert all(set(record["client_bytes"]) == {"client-0", "client-1", "client-2"} for record in int8)
    assert sum(item["up"] for item in int8[-1]["client_bytes"].values()) == int8[-1]["bytes_up"]
    assert int8[-1]["val_accuracy"] >= plain[-1]["val_accuracy"] - 0.05


def test_float16_downloads_halve_training_messages(config_data_factory):
    _, plain = run(config_data_factory, 1)
    _, half = run(config_data_factory, 1, download={"kind": "float16"})
    assert 0.45 < half[0]["bytes_down"] / plain[0]["bytes_down"] < 0.55


def test_error_feedback_learns_where_plain_topk_stalls(config_data_factory):
    # 2% of the coordinates: alone, mostly the same few win every round and the loss hardly moves
    # from chance (ln 3 = 1.10); with error feedback the rest accumulate until they are sent
    topk = {"kind": "topk", "fraction": 0.02}
    _, plain = run(config_data_factory, 8, upload=topk)
    simulation, feedback = run(config_data_factory, 8, upload={**topk, "error_feedback": True})
    assert plain[-1]["val_loss"] > 0.9 and feedback[-1]["val_loss"] < 0.5
    assert all(client.residual is not None for client in simulation.server.clients)


def test_error_feedback_residuals_are_checkpointed(config_data_factory, tmp_path):
    simulation, _ = run(config_data_factory, 1, upload={"kind": "topk", "fraction": 0.05, "error_feedback": True})
    config = simulation.config.model_dump(mode="json")
    save_checkpoint(simulation.server, tmp_path / "checkpoint", [], config)
    fresh = build_simulation(simulation.config)
    load_checkpoint(fresh.server, tmp_path / "checkpoint", config)
    for before, after in zip(simulation.server.clients, fresh.server.clients):
        assert torch.equal(before.residual, after.residual)
