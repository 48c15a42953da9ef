"""Client-level DP from config: epsilon every round, the budget stop, resume, bad settings."""

from __future__ import annotations

import json

import pytest

from conftest import read_metrics
from fedlm.config import parse_config
from fedlm.errors import ConfigError
from fedlm.privacy.accounting import compute_epsilon, noise_for_epsilon
from fedlm.runtime import build_simulation, run_federation
from fedlm.runtime.rounds import privacy_line

DP = {"noise_multiplier": 0.8, "clip_norm": 0.5, "delta": 1e-5}


def private_config(config_data_factory, tmp_path, name: str, rounds: int = 3, **dp):
    data = config_data_factory(num_clients=4, rounds=rounds, dp={**DP, **dp}, federation={"clients_per_round": 2})
    data["output_dir"] = str(tmp_path / name)
    return parse_config(data)


def test_every_round_reports_the_accountants_epsilon_and_the_summary_says_what_was_protected(
    config_data_factory, tmp_path
):
    config = private_config(config_data_factory, tmp_path, "run")
    history = run_federation(build_simulation(config))
    expected = [compute_epsilon(0.8, 2 / 4, rounds, 1e-5) for rounds in (1, 2, 3)]
    assert [record["epsilon"] for record in history] == pytest.approx(expected, rel=1e-9)
    assert all(record["dp_clip_norm"] == 0.5 and 0 <= record["dp_unclipped_fraction"] <= 1 for record in history)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert summary["epsilon"] == pytest.approx(expected[-1]) and summary["rounds_accounted"] == 3
    assert summary["noise_added_by"] == "the server" and "trusted" in summary["server_sees"]
    assert f"client-level DP epsilon {expected[-1]:.2f} (delta 1e-05)" in privacy_line(summary)


def test_max_epsilon_stops_before_the_budget_with_a_checkpoint_and_resume_reports_the_same_epsilon(
    config_data_factory, tmp_path
):
    budget = (compute_epsilon(0.8, 0.5, 2, 1e-5) + compute_epsilon(0.8, 0.5, 3, 1e-5)) / 2  # room for 2 rounds
    config = private_config(config_data_factory, tmp_path, "run", rounds=4, max_epsilon=budget)
    history = run_federation(build_simulation(config))
    assert [record["round"] for record in history] == [1, 2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "stopped before round 3" in summary["stopped"] and summary["privacy"]["epsilon"] <= budget
    # resuming with a larger budget continues from the checkpoint, charging from round 3 on
    resumed = config.model_copy(update={"dp": config.dp.model_copy(update={"max_epsilon": None})})
    more = run_federation(build_simulation(resumed), resume=True)
    assert [record["round"] for record in more] == [1, 2, 3, 4]
    assert more[-1]["epsilon"] == pytest.approx(compute_epsilon(0.8, 0.5, 4, 1e-5))
    assert [r["epsilon"] for r in read_metrics(tmp_path / "run")[1:3]] == [r["epsilon"] for r in history]


def test_target_epsilon_sets_the_noise_and_client_side_noise_runs(config_data_factory, tmp_path):
    config = private_config(
        config_data_factory, tmp_path, "target", noise_multiplier=None, target_epsilon=5.0, noise="clients"
    )
    simulation = build_simulation(config)
    assert simulation.server.strategy.noise_multiplier == pytest.approx(noise_for_epsilon(5.0, 0.5, 3, 1e-5))
    history = simulation.server.fit(rounds=3)
    assert history[-1]["epsilon"] == pytest.approx(5.0, rel=1e-3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dp": {**DP, "target_epsilon": 3.0}}, "give exactly one of noise_multiplier or target_epsilon"),
        ({"strategy": {"kind": "scaffold"}}, "scaffold's control variates"),
        ({"peft": {"method": "lora", "aggregation": "svd"}}, "dp with LoRA needs aggregation fedit or ffa"),
        ({"dp": {**DP, "max_epsilon": 0.01}}, r"a single round at noise multiplier 0.8 already exceeds max_epsilon"),
        ({"dp": {**DP, "adaptive": {"count_noise": 0.1}}}, "count_noise must exceed 0.4"),
    ],
)
def test_dp_settings_that_cannot_work_are_refused_before_training(config_data_factory, changes, message):
    data = config_data_factory(num_clients=4, rounds=2, dp=DP)
    data.update(changes)
    with pytest.raises(ConfigError, match=message):
        build_simulation(parse_config(data))


def test_dp_sgd_reports_each_clients_epsilon_every_round_and_resume_keeps_counting(config_data_factory, tmp_path):
    dp_sgd = {"noise_multiplier": 1.1, "clip_norm": 1.0, "delta": 1e-5}
    data = config_data_factory(num_clients=3, rounds=1, training={"dp_sgd": dp_sgd, "batch_size": 10})
    simulation = build_simulation(parse_config(data))
    history = run_federation(simulation)
    sizes = [len(client.data) for client in simulation.server.clients]

    def epsilon_after(rounds: int, n: int) -> float:  # local_epochs * round(n / batch) Poisson steps a round
        return compute_epsilon(1.1, 10 / n, rounds * 2 * round(n / 10), 1e-5)

    names = [client.name for client in simulation.server.clients]
    expected = {name: epsilon_after(1, n) for name, n in zip(names, sizes)}
    assert history[0]["client_dp_sgd_epsilon"] == pytest.approx(expected, rel=1e-9)
    assert history[0]["dp_sgd_epsilon_max"] == pytest.approx(max(expected.values()), rel=1e-9)
    data["federation"]["rounds"] = 2
    resumed = build_simulation(parse_config(data))
    more = run_federation(resumed, resume=True)
    expected = {name: epsilon_after(2, n) for name, n in zip(names, sizes)}
    assert more[-1]["client_dp_sgd_epsilon"] == pytest.approx(expected, rel=1e-9)
    report = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert report["sample_level_dp"] and not report["differential_privacy"]
    assert report["dp_sgd"]["client_epsilon"] == pytest.approx(expected) and report["dp_sgd"]["clip_norm"] == 1.0
    assert report["dp_sgd"]["epsilon_max"] == pytest.approx(max(expected.values()))
    assert f"DP-SGD epsilon up to {max(expected.values()):.2f} per client" in privacy_line(report)


def test_dp_sgd_with_an_adapter_opacus_cannot_handle_is_refused_before_training(config_data_factory):
    data = config_data_factory(training={"dp_sgd": {"noise_multiplier": 1.0}}, peft={"method": "ia3"})
    with pytest.raises(ConfigError, match="training.dp_sgd supports full fine-tuning and LoRA adapters, not peft"):
        parse_config(data)
