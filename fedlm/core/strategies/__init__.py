"""Aggregation strategies, one file per family, registered by name for configs."""

from __future__ import annotations

from fedlm.core.strategies.base import Strategy
from fedlm.core.strategies.fedavg import FedAvg, FedAvgM, FedProx
from fedlm.core.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from fedlm.core.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(name: str, strategy_class: type[Strategy]) -> None:
    """Make `strategy_class` selectable as `strategy: {kind: name}` in a config."""
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"strategy name {name!r} must be a lowercase identifier, such as 'fedavg'")
    if name in STRATEGIES:
        raise ValueError(f"a strategy named {name!r} is already registered ({STRATEGIES[name].__name__})")
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
