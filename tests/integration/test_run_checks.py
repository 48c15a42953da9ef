"""Runs that could not train, refused with a ConfigError when the run is built, before any round."""

from __future__ import annotations

import pytest
import torch

from fedlm.config import parse_config
from fedlm.errors import ConfigError
from fedlm.runtime import build_simulation
from fedlm.runtime.assemble import build_model, check_max_length
from fedlm.tasks.classification import LabelMap


def test_an_output_dir_under_a_file_names_output_dir(config_data_factory, tmp_path):
    (tmp_path / "some.csv").write_text("text,label\n")
    config = parse_config({**config_data_factory(), "output_dir": str(tmp_path / "some.csv" / "run")})
    with pytest.raises(ConfigError, match=r"output_dir .*some.csv/run: .*some.csv is a file"):
        build_simulation(config)


@pytest.mark.parametrize(
    ("device", "gpus", "message"),
    [
        ("cuda:7", 2, r"training.device cuda:7: this machine has 2 cuda device\(s\), cuda:0 to cuda:1"),
        ("cuda", 0, r"training.device cuda: this machine has no cuda device"),
    ],
)
def test_a_device_this_machine_lacks_says_what_it_has(config_data_factory, monkeypatch, device, gpus, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    config = parse_config(config_data_factory(training={"device": device}))
    with pytest.raises(ConfigError, match=message):
        build_simulation(config)


def test_max_length_beyond_the_models_positions_names_the_limit(config_data_factory):
    config = parse_config(config_data_factory(training={"max_length": 65}))  # the tiny model has 64 positions
    with pytest.raises(ConfigError, match=r"training.max_length 65 exceeds the 64 positions model .* at most 64"):
        build_simulation(config)


def test_max_length_is_checked_wherever_a_model_is_built(config_data_factory, tiny_model_dir, load_tiny):
    config = parse_config(config_data_factory(training={"max_length": 100}))
    with pytest.raises(ConfigError, match="training.max_length 100 exceeds the 64 positions"):
        build_model(
            config, str(tiny_model_dir), LabelMap.from_values("abc")
        )  # what a Flower node and the ServerApp call
    prompt = parse_config(
        config_data_factory(training={"max_length": 50}, peft={"method": "prompt_tuning", "num_virtual_tokens": 20})
    )
    with pytest.raises(ConfigError, match="max_length 50 plus peft.num_virtual_tokens 20 exceeds the 64 .* at most 44"):
        check_max_length(prompt, load_tiny(), str(tiny_model_dir))
    check_max_length(parse_config(config_data_factory(training={"max_length": 64})), load_tiny(), "tiny")


def test_a_roberta_style_model_loses_the_positions_before_its_padding_index(config_data_factory):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    sizes = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}
    model = RobertaForSequenceClassification(
        RobertaConfig(vocab_size=50, max_position_embeddings=66, pad_token_id=1, **sizes)
    )
    check_max_length(parse_config(config_data_factory(training={"max_length": 64})), model, "roberta")
    with pytest.raises(ConfigError, match="max_length 65 exceeds the 64 positions"):
        check_max_length(parse_config(config_data_factory(training={"max_length": 65})), model, "roberta")


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        # 4 clients, a quarter of them per round: one client, known only once the clients are
        ({"federation": {"fraction": 0.25, "min_clients": 2}}, r"federation.min_clients \(2\) exceeds the 1 client"),
        (
            {"federation": {"fraction": 0.25}, "secure_aggregation": {}},
            r"secure_aggregation needs at least 2 .*has 1 \(federation.fraction 0.25 of the 4 clients\)",
        ),
    ],
)
def test_rounds_that_cannot_aggregate_are_refused_once_the_clients_are_known(config_data_factory, sections, message):
    config = parse_config(config_data_factory(num_clients=4, **sections))
    with pytest.raises(ConfigError, match=message):
        build_simulation(config)
