"""The bundled pretrained model on the bundled BBC News corpus: the seed example and the demo."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_metrics, run_fedlm

pytestmark = pytest.mark.real_model


EXAMPLES = Path(__file__).parents[2] / "examples"


def test_seed_example_on_minilm_and_bbc_news(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "seed_api.py"),
            "--per-client",
            "120",
            "--held-out",
            "100",
            "--rounds",
            "2",
            "--max-length",
            "64",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    accuracy = [json.loads(line)["held_out_accuracy"] for line in result.stdout.splitlines() if line.startswith("{")]
    assert (
        len(accuracy) == 3
        and (tmp_path / "data" / "client1.csv").exists()
        and (tmp_path / "data" / "client2.jsonl").exists()
    )
    assert accuracy[-1] > 0.7 and accuracy[-1] > accuracy[0] + 0.4, accuracy  # chance is 0.2; 0.17 -> 0.94
    assert "'business'" in result.stdout and "'tech'" in result.stdout


def test_the_demos_config_learns_and_saves_a_model_that_predicts_the_same(tmp_path):
    """The demo's own config (`fedlm demo --print-config`), shortened to 600 articles of 64 tokens
    and one round: a third of the demo's cost. `fedlm demo` runs that config as `fedlm run` does."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    printed = run_fedlm("demo", "--print-config", "--rounds", "1", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    config = yaml.safe_load(printed.stdout)
    assert config["model"]["name"] == "minilm" and config["data"]["dataset"] == "bbc-news"
    assert config["federation"]["rounds"] == 1
    config["data"]["max_examples"], config["training"]["max_length"] = 600, 64
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))

    result = run_fedlm("run", "demo.yaml", "--output-dir", "demo", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = read_metrics(tmp_path / "demo")
    assert lines[1]["val_accuracy"] > lines[0]["val_accuracy"] + 0.25  # 0.13 -> 0.50
    assert "round 1/1" in result.stdout

    from fedlm.config import load_config
    from fedlm.runtime import build_simulation

    validation = build_simulation(load_config(tmp_path / "demo.yaml")).validation
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "demo" / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "demo" / "model")
    assert tokenizer.model_max_length >= 64
    predictions = []
    with torch.no_grad():
        for start in range(0, len(validation), 50):
            ids = validation.input_ids[start : start + 50]
            width = max(map(len, ids))
            batch = torch.tensor([row + [0] * (width - len(row)) for row in ids])
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
            predictions += model(input_ids=batch, attention_mask=mask).logits.argmax(-1).tolist()
    reloaded_accuracy = sum(p == y for p, y in zip(predictions, validation.labels)) / len(validation)
    assert reloaded_accuracy == pytest.approx(lines[1]["val_accuracy"], abs=1e-9)
