"""Tasks: what a federation trains and measures (`Task`), one file each, registered by kind.

`TASKS` maps each kind to its `Task` class; a run config's `task: {kind: ...}` section selects one
(its options are the section's fields; `fedlm.register_task` registers both from a plug-in).
"""

from __future__ import annotations

from typing import Any

from fedlm.errors import ConfigError
from fedlm.models.loading import is_causal_lm
from fedlm.tasks.base import Task
from fedlm.tasks.causal_lm import CausalLMTask
from fedlm.tasks.classification import ClassificationTask
from fedlm.tasks.seq2seq import Seq2SeqTask, is_seq2seq
from fedlm.tasks.token_classification import TokenClassificationTask

TASKS: dict[str, type[Task]] = {}


def check_task_class(name: str, task_class: type[Task]) -> None:
    """Raise unless `task_class` may be registered as task `name`."""
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"task name {name!r} must be a lowercase identifier, such as 'classification'")
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered ({TASKS[name].__name__}); choose another name")
    if not (isinstance(task_class, type) and issubclass(task_class, Task)):
        raise TypeError(f"task {name!r} must be a subclass of fedlm.tasks.Task, got {task_class!r}")
    if getattr(task_class, "kind", None) != name:
        raise ValueError(f"{task_class.__name__} must declare `kind = {name!r}` to be registered as task {name!r}")
    missing = [field for field in ("metrics", "headline") if not hasattr(task_class, field)]
    if missing:
        raise ValueError(f"{task_class.__name__} must declare {missing} (the metrics its evaluate reports)")
    if task_class.headline not in task_class.metrics:
        raise ValueError(
            f"{task_class.__name__}.headline {task_class.headline!r} must be one of its metrics {list(task_class.metrics)}"
        )


def register_task(name: str, task_class: type[Task]) -> None:
    """Make `task_class` the task of kind `name`. Plug-ins call `fedlm.register_task`, which
    registers its config section along with it."""
    check_task_class(name, task_class)
    TASKS[name] = task_class


def task_for(kind: str, **options: Any) -> Task:
    """The task registered as `kind`, built with `options`."""
    if kind not in TASKS:
        raise ConfigError(f"unknown task {kind!r}; registered tasks are {list(TASKS)} (fedlm.register_task adds one)")
    return TASKS[kind](**options)


def task_of_model(model: Any) -> Task:
    """The task of a model given without one (`FedClient(model=...)`): causal_lm for a causal
    language model, seq2seq for an encoder-decoder one, token_classification for a token
    classifier, classification otherwise."""
    if is_causal_lm(model):
        return CausalLMTask()
    if is_seq2seq(model):
        return Seq2SeqTask()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return TokenClassificationTask() if type(base).__name__.endswith("ForTokenClassification") else ClassificationTask()


register_task("classification", ClassificationTask)
register_task("causal_lm", CausalLMTask)
register_task("token_classification", TokenClassificationTask)
register_task("seq2seq", Seq2SeqTask)

__all__ = [
    "TASKS",
    "CausalLMTask",
    "ClassificationTask",
    "Seq2SeqTask",
    "Task",
    "TokenClassificationTask",
    "check_task_class",
    "register_task",
    "task_for",
    "task_of_model",
]
