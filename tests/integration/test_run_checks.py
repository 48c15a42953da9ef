"""Runs that could not train, refused with a ConfigError when the run is built, before any round."""

from __future__ import annotations

import pytest
import torch

from fedlm.config import parse_config
from fedlm.errors import ConfigError
from fedlm.runtime import build_simulation


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
