"""The task registry: one call registers a task and its config section, loud on mistakes, and
an unknown kind names the registered ones."""

from __future__ import annotations

from typing import Literal

import pytest

import fedlm
from fedlm.config import TASK_SECTIONS, TaskBase, parse_config
from fedlm.errors import ConfigError
from fedlm.tasks import TASKS, CausalLMTask, ClassificationTask, Seq2SeqTask, TokenClassificationTask, task_for


class Renamed(ClassificationTask):
    kind = "renamed"


class RenamedConfig(TaskBase):
    kind: Literal["renamed"] = "renamed"
    max_labels: int = 7


@pytest.fixture
def registries():
    classes, sections = dict(TASKS), dict(TASK_SECTIONS)
    yield
    TASKS.clear()
    TASKS.update(classes)
    TASK_SECTIONS.clear()
    TASK_SECTIONS.update(sections)


def test_classification_is_registered_on_both_sides_and_is_the_default():
    assert TASKS == {
        "classification": ClassificationTask, "causal_lm": CausalLMTask,
        "token_classification": TokenClassificationTask, "seq2seq": Seq2SeqTask,
    }  # fmt: skip
    assert list(TASK_SECTIONS) == ["classification", "causal_lm", "token_classification", "seq2seq"]
    assert parse_config({}).task.kind == "classification"
    assert isinstance(task_for("classification"), ClassificationTask)


def test_an_unknown_kind_lists_the_registered_kinds():
    with pytest.raises(
        ConfigError,
        match=r"unknown task 'regression'; registered tasks are \['classification', 'causal_lm', 'token_classification', 'seq2seq'\]",
    ):
        task_for("regression")
    with pytest.raises(ConfigError) as error:
        parse_config({"task": {"kind": "regression"}})
    assert str(error.value).endswith(
        "task: Input tag 'regression' found using 'kind' does not match any of the expected tags: 'classification', 'causal_lm', "
        "'token_classification', 'seq2seq'"
    )


def test_registration_refuses_taken_and_bad_names_and_classes_that_do_not_fit(registries):
    with pytest.raises(ValueError, match=r"a task section named 'classification' is already registered"):
        fedlm.register_task("classification", ClassificationTask)
    with pytest.raises(ValueError, match="task name 'Re-named' must be a lowercase identifier"):
        fedlm.register_task("Re-named", Renamed)
    with pytest.raises(TypeError, match="task 'renamed' must be a subclass of fedlm.tasks.Task"):
        fedlm.register_task("renamed", dict, RenamedConfig)
    with pytest.raises(ValueError, match=r"ClassificationTask must declare `kind = 'renamed'`"):
        fedlm.register_task("renamed", ClassificationTask, RenamedConfig)
    with pytest.raises(ValueError, match=r"RenamedConfig must declare `kind: Literal\['other'\] = 'other'`"):
        fedlm.register_task("other", Renamed, RenamedConfig)
    assert "renamed" not in TASKS and "renamed" not in TASK_SECTIONS  # nothing half-registered
    fedlm.register_task("renamed", Renamed, RenamedConfig)
    with pytest.raises(ValueError, match="'renamed' is already registered .*choose another name"):
        fedlm.register_task("renamed", Renamed, RenamedConfig)


def test_a_registered_task_is_built_from_its_section(registries):
    from fedlm.runtime.federated_data import build_task

    fedlm.register_task("renamed", Renamed, RenamedConfig)
    task = build_task(parse_config({"task": {"kind": "renamed"}, "data": {"max_labels": 50}}))
    assert type(task) is Renamed and task.max_labels == 7  # the section's own value wins
    assert build_task(parse_config({"data": {"max_labels": 50}})).max_labels == 50  # classification: data.max_labels
