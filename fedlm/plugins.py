"""What a plug-in calls to add to fedlm: `register_strategy(name, strategy_class, section)` makes
a strategy selectable as `strategy: {kind: name, ...}` in a run config, and
`register_task(name, task_class, section)` a task as `task: {kind: name, ...}`.

A plug-in is a module (or a .py file) that makes these calls when imported; a run config lists
it under `plugins:` so that `fedlm run` imports it before validating the rest of the config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import create_model

from fedlm.config import (
    StrategyBase,
    TaskBase,
    check_strategy_section,
    check_task_section,
    register_strategy_section,
    register_task_section,
)
from fedlm.core.strategies import Strategy
from fedlm.core.strategies import register_strategy as register_strategy_class
from fedlm.tasks import Task, check_task_class
from fedlm.tasks import register_task as register_task_class


def register_strategy(name: str, strategy_class: type[Strategy], section: type[StrategyBase]) -> None:
    """Register `strategy_class` under `name` with `section`, the pydantic model of its config
    section: a subclass of `fedlm.config.StrategyBase` (which brings `robust` and `clip_norm`)
    declaring `kind: Literal[name] = name` and one field per option of the class's constructor.

    The strategy is built as `strategy_class(**options)`, the options being the section's fields
    other than `kind` (`robust` as a robust aggregate); a constructor that takes `num_clients`
    gets the run's number of clients, unless the section sets it. A bad or taken name, or a
    section that does not fit, raises before either registry changes.
    """
    check_strategy_section(name, section)
    register_strategy_class(name, strategy_class)
    register_strategy_section(name, section)


def register_task(name: str, task_class: type[Task], section: type[TaskBase] | None = None) -> None:
    """Register `task_class` (a `fedlm.tasks.Task` subclass with `kind = name`) under `name`, with
    `section`, the pydantic model of its config section: a subclass of `fedlm.config.TaskBase`
    declaring `kind: Literal[name] = name` and one field per option of the class's constructor
    (None: a section with `kind` only, for a task without options).

    The task is built as `task_class(**options)`, the options being the section's fields other
    than `kind`; a constructor that takes `max_labels` gets the run's `data.max_labels`, unless the
    section sets it. A bad or taken name, or a class or section that does not fit, raises before
    either registry changes.
    """
    if section is None:
        section = create_model(f"{task_class.__name__}Config", __base__=TaskBase, kind=(Literal[name], name))
    check_task_section(name, section)
    check_task_class(name, task_class)
    register_task_class(name, task_class)
    register_task_section(name, section)
