"""A task registered from outside fedlm (fedlm.register_task): a toy regression of a number column
on the tiny model, trained through `FedServer.fit` and through `fedlm run` with a `plugins:` file,
with no change to fedlm's code. Rows without a label column load for it; classification still
refuses them."""

from __future__ import annotations

import inspect
import json
import random
import sys
import textwrap
from typing import Any

import pytest
import torch
import yaml

import fedlm
from conftest import FILLER, TOPIC_WORDS, run_fedlm
from fedlm import FedClient, FedServer
from fedlm.config import TASK_SECTIONS, parse_config
from fedlm.data.dataset import TextDataset, load_text_dataset
from fedlm.errors import ConfigError, DatasetError, ModelError
from fedlm.models.loading import load_pretrained
from fedlm.tasks import TASKS, Task
from fedlm.tasks.text import EncodedDataset, batches

TOPIC_SCORES = {"business": 0.0, "sport": 1.0, "tech": 2.0}  # an easy target: which topic words a text holds
FAST = {"learning_rate": 3e-3, "max_length": 32, "batch_size": 16}


class ScoreRegression(Task):
    """Predict the number in a text's `score` column: one output unit, MSE loss (transformers'
    problem_type "regression"), MSE as the headline metric. A test plug-in."""

    kind = "score_regression"
    metrics = ("mse",)
    headline = "mse"
    target_dtype = torch.float32

    def read(
        self, dataset: Any, text_column: str | None = None, target_column: str | None = None, owner: str = "dataset"
    ) -> TextDataset:
        data = load_text_dataset(dataset, text_column, target_column, owner, label_aliases=("score",))
        for row, value in enumerate(data.labels):
            try:
                float(value)
            except (TypeError, ValueError):
                raise DatasetError(f"{owner}: {data.source} row {row}: score must be a number, got {value!r}") from None
        return data

    def encode_targets(self, metadata: Any, targets: list[Any], owner: str) -> list[float]:
        return [float(value) for value in targets]

    def load_model(self, name_or_path: str, metadata: Any, seed: int) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        return load_pretrained(
            AutoModelForSequenceClassification, name_or_path, seed, num_labels=1, problem_type="regression"
        )

    def check_model(self, model: torch.nn.Module, metadata: Any, owner: str) -> None:
        if model.config.num_labels != 1 or model.config.problem_type != "regression":
            raise ModelError(f"{owner}: score regression needs a model with one regression output")

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, data: EncodedDataset, batch_size: int, pad_id: int, device: str = "cpu"
    ) -> dict[str, float]:
        was_training = model.training
        model.eval()
        squared_error = 0.0
        for batch in batches(data, batch_size, pad_id):
            batch = {key: value.to(device) for key, value in batch.items()}
            predictions = model(**batch).logits.squeeze(-1)
            squared_error += float(((predictions - batch["labels"]) ** 2).sum())
        model.train(was_training)
        mse = squared_error / len(data)
        return {"loss": mse, "mse": mse}


def score_rows(num: int, seed: int) -> list[dict]:
    """Texts of one topic each (filler plus three topic words) and the topic's score; no label column."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        topic = rng.choice(sorted(TOPIC_WORDS))
        words = rng.sample(FILLER, 6) + rng.sample(TOPIC_WORDS[topic], 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": TOPIC_SCORES[topic]})
    return rows


@pytest.fixture
def registries():
    """Put both task registries (and the plug-in files loaded) back as they were after the test."""
    classes, sections, modules = dict(TASKS), dict(TASK_SECTIONS), set(sys.modules)
    yield
    TASKS.clear()
    TASKS.update(classes)
    TASK_SECTIONS.clear()
    TASK_SECTIONS.update(sections)
    for name in set(sys.modules) - modules:
        if name.startswith("fedlm_plugin_"):
            del sys.modules[name]


@pytest.fixture
def score_regression(registries):
    fedlm.register_task("score_regression", ScoreRegression)


def independent_mse(model: torch.nn.Module, tokenizer: Any, rows: list[dict]) -> float:
    """The MSE of `model`'s predictions on `rows`, one unpadded text at a time."""
    model.eval()
    errors = []
    with torch.no_grad():
        for row in rows:
            input_ids = torch.tensor([tokenizer(row["text"], truncation=True, max_length=32)["input_ids"]])
            errors.append((float(model(input_ids=input_ids).logits[0, 0]) - row["score"]) ** 2)
    return sum(errors) / len(errors)


def test_rows_without_a_label_column_load_for_the_task_and_classification_still_refuses_them(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("text,score\nmarket shares,0\ngame match,1.5\n")
    data = ScoreRegression().read(path, owner="client a")
    assert data.texts == ["market shares", "game match"] and data.labels == ["0", "1.5"]
    with pytest.raises(DatasetError, match=r"client a: list of records row 1: score must be a number, got 'high'"):
        ScoreRegression().read([{"text": "x", "score": 1}, {"text": "y", "score": "high"}], owner="client a")
    message = rf"client a: {path} has no label column; its columns are \['score', 'text'\]"
    with pytest.raises(DatasetError, match=message):
        fedlm.tasks.ClassificationTask().read(path, owner="client a")
    with pytest.raises(
        DatasetError, match=r"client scores: .* has no label column; its columns are \['score', 'text'\]"
    ):
        FedClient(str(path), model=torch.nn.Linear(1, 1), tokenizer=object())  # the seed API's default task


def test_the_registered_task_trains_and_reports_its_metric_through_server_fit(score_regression, tiny_model_dir):
    task = fedlm.tasks.task_for("score_regression")
    model = task.load_model(str(tiny_model_dir), None, seed=0)
    clients = [
        FedClient(score_rows(80, seed), model, name=f"client-{seed}", test_dataset=score_rows(20, seed + 10),
                  task="score_regression", **FAST)
        for seed in (1, 2)
    ]  # fmt: skip
    assert all(isinstance(client.task, ScoreRegression) for client in clients)
    server = FedServer(clients)
    validation = score_rows(60, seed=99)
    before = server.evaluate(validation)
    assert set(before) == {"loss", "mse"}
    records = server.fit(rounds=3, local_epochs=2, validation=validation)
    last = records[-1]
    assert "val_accuracy" not in last and "client_accuracy_mean" not in last
    assert last["val_mse"] < 0.5 * before["mse"], (before["mse"], last["val_mse"])
    assert last["client_mse_mean"] < before["mse"] and last["clients_evaluated"] == 2
    final = server.get_model()
    assert final.config.num_labels == 1 and final.config.problem_type == "regression"
    assert last["val_mse"] == pytest.approx(independent_mse(final, clients[0].tokenizer, validation), rel=1e-4)


def test_a_task_without_class_labels_refuses_label_skew_and_distillation(score_regression, tiny_model_dir, tmp_path):
    from fedlm.runtime import build_simulation

    path = tmp_path / "scores.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in score_rows(60, seed=3)))
    base = {
        "task": {"kind": "score_regression"},
        "model": {"name": str(tiny_model_dir)},
        "training": {"max_length": 32},
        "output_dir": str(tmp_path / "run"),
    }
    skewed = {
        **base,
        "data": {"dataset": str(path), "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 2}},
    }
    with pytest.raises(ConfigError, match="data.partition.kind dirichlet skews the class labels, and task 'score_regr"):
        build_simulation(parse_config(skewed))
    distilled = {
        **base,
        "data": {"dataset": str(path), "partition": {"kind": "iid", "num_clients": 2}},
        "algorithm": {"kind": "distillation", "public_data": {"held_out": 0.2}},
    }
    with pytest.raises(ConfigError, match="algorithm distillation distils class probabilities, and task 'score_regr"):
        build_simulation(parse_config(distilled))


def test_the_task_section_selects_the_registered_task_and_default_configs_dump_as_before(score_regression):
    config = parse_config({"task": {"kind": "score_regression"}})
    assert config.task.kind == "score_regression" and config.model_dump()["task"] == {"kind": "score_regression"}
    assert parse_config(yaml.safe_load(config.to_yaml())) == config
    assert "task" not in parse_config({"task": {"kind": "classification"}}).model_dump()
    with pytest.raises(ConfigError, match=r"task\.score_regression\.alpha: Extra inputs are not permitted"):
        parse_config({"task": {"kind": "score_regression", "alpha": 1}})


PLUGIN_HEADER = """
from typing import Any

import torch

import fedlm
from fedlm.data.dataset import TextDataset, load_text_dataset
from fedlm.errors import DatasetError, ModelError
from fedlm.models.loading import load_pretrained
from fedlm.tasks import Task
from fedlm.tasks.text import EncodedDataset, batches

"""


def test_fedlm_run_trains_the_task_of_a_plugin_file(tmp_path, tiny_model_dir):
    plugin = tmp_path / "score_task.py"
    plugin.write_text(
        textwrap.dedent(PLUGIN_HEADER)
        + inspect.getsource(ScoreRegression)
        + '\n\nfedlm.register_task("score_regression", ScoreRegression)\n'
    )
    data = tmp_path / "scores.csv"
    data.write_text("text,score\n" + "".join(f"{row['text']},{row['score']}\n" for row in score_rows(160, seed=5)))
    config = {
        "plugins": ["score_task.py"],
        "task": {"kind": "score_regression"},
        "model": {"name": str(tiny_model_dir)},
        "data": {"dataset": str(data), "partition": {"kind": "iid", "num_clients": 2}},
        "federation": {"rounds": 2},
        "training": {"local_epochs": 2, "learning_rate": 3e-3, "max_length": 32},
        "output_dir": "out",
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = run_fedlm("run", "run.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all("val_mse" in line and "val_accuracy" not in line for line in lines)
    assert lines[-1]["val_mse"] < lines[0]["val_mse"] and "client_mse_mean" in lines[-1]
    assert "val mse" in result.stdout and "client mse mean" in result.stdout
    saved = json.loads((tmp_path / "out" / "model" / "fedlm.json").read_text())
    assert saved["task"] == "score_regression" and saved["metadata"] is None
    partition = json.loads((tmp_path / "out" / "partition.json").read_text())
    assert partition["labels"] == [] and not (tmp_path / "out" / "partition.png").exists()
