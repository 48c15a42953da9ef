"""A strategy registered from outside fedlm (fedlm.register_strategy) is selectable from a config,
validated like a built-in one, built by the runtime, and loaded by a config's `plugins:` key."""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any, Literal

import pytest
import torch
from pydantic import Field

import fedlm
from fedlm.config import STRATEGY_SECTIONS, StrategyBase, parse_config
from fedlm.core.strategies import STRATEGIES, Strategy
from fedlm.core.update import ClientUpdate
from fedlm.errors import ConfigError
from fedlm.runtime import build_simulation
from fedlm.runtime.assemble import build_strategy


class MedianStep(Strategy):
    """w <- w + step * median_k(delta_k), per coordinate and unweighted (a test plug-in)."""

    def __init__(self, step: float = 1.0, **common: Any) -> None:
        super().__init__(**common)
        self.step = step
        self.calls = 0

    def aggregate(self, global_params: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        self.calls += 1
        deltas = torch.stack([update.delta for update in updates])
        return global_params + self.step * deltas.median(dim=0).values


class MedianStepConfig(StrategyBase):
    kind: Literal["median_step"] = "median_step"
    step: float = Field(1.0, gt=0, le=2, description="server step size on the median delta")


class PerClient(MedianStep):
    """Takes the run's number of clients, as SCAFFOLD does."""

    def __init__(self, num_clients: int, **options: Any) -> None:
        super().__init__(**options)
        self.num_clients = num_clients


class PerClientConfig(StrategyBase):
    kind: Literal["per_client"] = "per_client"


@pytest.fixture
def registries():
    """Put both strategy registries (and the plug-in files loaded) back as they were after the test."""
    classes, sections, modules = dict(STRATEGIES), dict(STRATEGY_SECTIONS), set(sys.modules)
    yield
    STRATEGIES.clear()
    STRATEGIES.update(classes)
    STRATEGY_SECTIONS.clear()
    STRATEGY_SECTIONS.update(sections)
    for name in set(sys.modules) - modules:
        if name.startswith("fedlm_plugin_"):
            del sys.modules[name]


@pytest.fixture
def median_step(registries):
    fedlm.register_strategy("median_step", MedianStep, MedianStepConfig)


def test_the_plugin_aggregate_is_the_scaled_coordinate_median():
    updates = [ClientUpdate(torch.tensor(delta), 1) for delta in ([1.0, 10.0, -2.0], [3.0, 0.0, 0.0], [2.0, 5.0, 4.0])]
    new = MedianStep(step=0.5).aggregate(torch.ones(3), updates)
    assert torch.equal(new, torch.tensor([1 + 0.5 * 2, 1 + 0.5 * 5, 1 + 0.5 * 0]))


def test_a_registered_strategy_is_selected_and_validated_by_the_config(median_step):
    config = parse_config({"strategy": {"kind": "median_step", "step": 0.5, "clip_norm": 2.0}})
    assert isinstance(config.strategy, MedianStepConfig)
    assert (config.strategy.kind, config.strategy.step, config.strategy.clip_norm) == ("median_step", 0.5, 2.0)
    assert parse_config(config.model_dump(mode="json")) == config
    assert parse_config(__import__("yaml").safe_load(config.to_yaml())) == config
    with pytest.raises(ConfigError, match=r"strategy\.median_step\.step: Input should be less than or equal to 2"):
        parse_config({"strategy": {"kind": "median_step", "step": 3}})
    with pytest.raises(ConfigError, match=r"strategy\.median_step\.mu: Extra inputs are not permitted"):
        parse_config({"strategy": {"kind": "median_step", "mu": 0.1}})
    with pytest.raises(ConfigError, match=r"strategy\.median_step\.robust\.trimmed_mean\.beta"):
        parse_config({"strategy": {"kind": "median_step", "robust": {"kind": "trimmed_mean", "beta": 0.7}}})
    with pytest.raises(ConfigError) as error:
        parse_config({"strategy": {"kind": "fedsgd"}})
    assert str(error.value).endswith(
        "strategy: Input tag 'fedsgd' found using 'kind' does not match any of the expected tags: 'fedavg', "
        "'fedavgm', 'fedprox', 'fedadagrad', 'fedadam', 'fedyogi', 'scaffold', 'median_step'"
    )


def test_built_in_kinds_are_registered_on_both_sides_in_the_same_order():
    assert list(STRATEGY_SECTIONS) == list(STRATEGIES)
    assert all(kind in STRATEGY_SECTIONS[kind].model_fields["kind"].annotation.__args__ for kind in STRATEGY_SECTIONS)


def test_an_unregistered_strategy_is_unknown_again_after_the_cleanup():
    with pytest.raises(ConfigError, match="Input tag 'median_step'"):
        parse_config({"strategy": {"kind": "median_step"}})


def test_registration_refuses_taken_and_bad_names_and_sections_that_do_not_fit(registries):
    with pytest.raises(ValueError, match=r"a strategy section named 'fedavg' is already registered \(FedAvgConfig\)"):
        fedlm.register_strategy("fedavg", MedianStep, MedianStepConfig)
    with pytest.raises(ValueError, match="'Median-Step' must be a lowercase identifier"):
        fedlm.register_strategy("Median-Step", MedianStep, MedianStepConfig)
    with pytest.raises(ValueError, match=r"MedianStepConfig must declare `kind: Literal\['other'\] = 'other'`"):
        fedlm.register_strategy("other", MedianStep, MedianStepConfig)
    with pytest.raises(TypeError, match="must subclass fedlm.config.StrategyBase"):
        fedlm.register_strategy("median_step", MedianStep, dict)
    with pytest.raises(TypeError, match="must be a subclass of fedlm.core.strategies.Strategy"):
        fedlm.register_strategy("median_step", dict, MedianStepConfig)
    assert "median_step" not in STRATEGIES and "median_step" not in STRATEGY_SECTIONS  # nothing half-registered
    fedlm.register_strategy("median_step", MedianStep, MedianStepConfig)
    with pytest.raises(ValueError, match="'median_step' is already registered .*choose another name"):
        fedlm.register_strategy("median_step", MedianStep, MedianStepConfig)


def test_build_strategy_passes_the_options_and_the_number_of_clients_to_whoever_takes_it(median_step):
    config = parse_config({"strategy": {"kind": "median_step", "step": 0.25, "robust": {"kind": "median"}}})
    strategy = build_strategy(config.strategy, num_clients=7)
    assert type(strategy) is MedianStep and strategy.step == 0.25 and strategy.robust is not None
    fedlm.register_strategy("per_client", PerClient, PerClientConfig)
    assert build_strategy(parse_config({"strategy": {"kind": "per_client"}}).strategy, num_clients=7).num_clients == 7
    assert build_strategy(parse_config({"strategy": {"kind": "scaffold"}}).strategy, num_clients=5).num_clients == 5


def test_the_simulation_aggregates_with_the_registered_strategy(median_step, config_data_factory):
    data = config_data_factory(num_clients=3, rounds=1, strategy={"kind": "median_step", "step": 0.5})
    simulation = build_simulation(parse_config(data))
    server = simulation.server
    assert isinstance(server.strategy, MedianStep) and server.strategy.step == 0.5
    before = server.global_params.clone()
    server.fit(rounds=1)
    assert server.strategy.calls == 1 and not torch.equal(server.global_params, before)


PLUGIN = """
from typing import Literal

from pydantic import Field

import fedlm
from fedlm.config import StrategyBase
from fedlm.core.strategies import FedAvg


class HalfStepConfig(StrategyBase):
    kind: Literal["half_step"] = "half_step"
    server_lr: float = Field(0.5, gt=0, le=1)


fedlm.register_strategy("half_step", FedAvg, HalfStepConfig)
"""


def test_the_plugins_key_imports_files_and_modules_before_the_strategy_is_validated(registries, tmp_path, monkeypatch):
    (tmp_path / "half_step.py").write_text(textwrap.dedent(PLUGIN))
    config = parse_config({"plugins": [str(tmp_path / "half_step.py")], "strategy": {"kind": "half_step"}})
    assert config.strategy.kind == "half_step" and config.strategy.server_lr == 0.5
    assert parse_config(config.model_dump(mode="json")) == config  # loaded once: no duplicate registration
    assert config.model_dump()["plugins"] == [str(tmp_path / "half_step.py")]
    assert "plugins" not in parse_config({}).model_dump()  # configs without plug-ins dump as before

    (tmp_path / "more_plugins").mkdir()
    (tmp_path / "more_plugins" / "quarter_step.py").write_text(
        textwrap.dedent(PLUGIN).replace("half_step", "quarter_step").replace("HalfStep", "QuarterStep")
    )
    monkeypatch.syspath_prepend(str(tmp_path / "more_plugins"))
    monkeypatch.delitem(sys.modules, "quarter_step", raising=False)
    assert parse_config({"plugins": ["quarter_step"], "strategy": {"kind": "quarter_step"}}).strategy.server_lr == 0.5


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("missing_plugin.py", r"plugins\.0: Value error, plugin file missing_plugin.py does not exist"),
        ("no_such_plugin_module", r"plugins\.0: .*plugin module 'no_such_plugin_module' not found"),
        ("not a module", r"plugins\.0: .*neither a module name .*nor a .py file"),
    ],
)
def test_a_plugin_that_cannot_be_imported_is_a_config_error_naming_it(registries, entry, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"plugins": [entry]})


def test_a_plugin_that_fails_names_itself_and_its_error(registries, tmp_path):
    (tmp_path / "dup.py").write_text("import fedlm\nfrom fedlm.core.strategies import FedAvg\n"
                                     "from fedlm.config import FedAvgConfig\n"
                                     "fedlm.register_strategy('fedavg', FedAvg, FedAvgConfig)\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"plugins\.0: .*dup.py failed while loading: ValueError: a strategy "
                       r"section named 'fedavg' is already registered .*dup.py, line 4\)"):  # fmt: skip
        parse_config({"plugins": [str(tmp_path / "dup.py")]})


def test_a_supernode_imports_only_the_plugins_its_node_config_allows(tmp_path):
    from fedlm.runtime.flower.flower_app import RUN_CONFIG_KEY, config_from_run_config

    marker = tmp_path / "imported"
    plugin = tmp_path / "node_plugin.py"
    plugin.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('yes')\n")
    run_config = {RUN_CONFIG_KEY: json.dumps({"plugins": [str(plugin)]})}
    with pytest.raises(ConfigError, match="does not allow"):
        config_from_run_config(run_config, allowed_plugins=set())
    assert not marker.exists()  # refused before anything was imported
    assert config_from_run_config(run_config, allowed_plugins={str(plugin)}).plugins == [str(plugin)]
    assert marker.read_text() == "yes"
