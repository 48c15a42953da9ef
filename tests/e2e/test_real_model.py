"""The bundled pretrained model on the bundled BBC News corpus: the seed example and the demo."""

import csv
import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def bbc_split(tmp_path_factory):
    """client1.csv and client2.jsonl carved from BBC News, plus a disjoint held-out set."""
    from fedlm.data import load_bundled_dataset

    data = load_bundled_dataset("bbc-news")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    records = [{"text": data.texts[i], "label": data.labels[i]} for i in order]
    folder = tmp_path_factory.mktemp("bbc")
    with (folder / "client1.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(records[:160])
    (folder / "client2.jsonl").write_text("\n".join(json.dumps(r) for r in records[160:320]))
    return folder, records[320:520]


def test_seed_example_on_minilm_and_bbc_news(bbc_split):
    from transformers import AutoModelForSequenceClassification

    from fedlm import FedClient, FedServer
    from fedlm.models import resolve_model_path

    folder, held_out = bbc_split
    path = resolve_model_path("minilm")
    options = {"max_length": 96, "learning_rate": 1e-4}
    client1 = FedClient(
        dataset=str(folder / "client1.csv"),
        model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=5),
        **options,
    )
    client2 = FedClient(
        dataset=str(folder / "client2.jsonl"),
        model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=5),
        **options,
    )
    clients = [client1, client2]
    server = FedServer(clients)
    untrained = server.evaluate(held_out)["accuracy"]
    for _ in range(3):
        for client in clients:
            client.local_train(epochs=1)
        server.aggregate_parameters()
        server.broadcast_model()
    fed_model = server.get_model()
    accuracy = server.evaluate(held_out)["accuracy"]
    assert accuracy > 0.7 and accuracy > untrained + 0.4, (untrained, accuracy)  # chance is 0.2
    assert sorted(fed_model.config.label2id) == ["business", "entertainment", "politics", "sports", "tech"]


def test_demo_runs_and_saves_a_model_that_predicts_the_same(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = subprocess.run(
        [sys.executable, "-m", "fedlm.cli", "demo", "--rounds", "1", "--output-dir", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["val_accuracy"] > lines[0]["val_accuracy"] + 0.25
    assert "round 1/1" in result.stdout

    from fedlm.cli import DEMO_CONFIG
    from fedlm.config import parse_config
    from fedlm.runtime import build_simulation

    config = parse_config({**DEMO_CONFIG, "federation": {**DEMO_CONFIG["federation"], "rounds": 1}})
    validation = build_simulation(config).validation
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "demo" / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "demo" / "model")
    assert tokenizer.model_max_length >= 128
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
