"""Aggregation strategies, one file per family, registered by name.

`STRATEGIES` is the class registry; a config selects a strategy through the section registered
under the same name in `fedlm.config.STRATEGY_SECTIONS` (`fedlm.register_strategy` adds to both).
"""

from __future__ import annotations

from fedlm.core.strategies.base import Strategy
from fedlm.core.strategies.fedavg import FedAvg, FedAvgM, FedProx
from fedlm.core.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from fedlm.core.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(name: str, strategy_class: type[Strategy]) -> None:
    """Add `strategy_class` to the class registry under `name`. To make it selectable as
    `strategy: {kind: name}` in a config, call `fedlm.register_strategy`, which also registers its
    config section."""
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"strategy name {name!r} must be a lowercase identifier, such as 'fedavg'")
    if name in STRATEGIES:
        raise ValueError(
            f"a strategy named {name!r} is already registered ({STRATEGIES[name].__name__}); choose another name"
        )
    if not (isinstance(strategy_class, type) and issubclass(strategy_class, Strategy)):
        raise TypeError(
            f"strategy {name!r} must be a subclass of fedlm.core.strategies.Strategy, got {strategy_class!r}"
        )
    STRATEGIES[name] = strategy_class


for _name, _class in {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "scaffold": Scaffold,
}.items():
    register_strategy(_name, _class)

__all__ = [
    "STRATEGIES",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "Scaffold",
    "Strategy",
    "register_strategy",
]
