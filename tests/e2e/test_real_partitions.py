"""`fedlm run` on the example configs (shortened): non-IID BBC News on the bundled model, and the
multilingual natural split, whose partition and per-language evaluation the tiny model checks."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import read_metrics, run_fedlm

CONFIGS = Path(__file__).parents[2] / "examples" / "configs"


def run_shortened(name, tmp_path, **changes):
    config = yaml.safe_load((CONFIGS / name).read_text())
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = run_fedlm("run", "run.yaml", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = read_metrics(tmp_path / "out")
    return result.stdout, lines, json.loads((tmp_path / "out" / "partition.json").read_text())


@pytest.mark.real_model
def test_bbc_news_with_dirichlet_label_skew(tmp_path):
    stdout, lines, partition = run_shortened(
        "bbc-dirichlet.yaml",
        tmp_path,
        data={"max_examples": 400},
        federation={"rounds": 2, "clients_per_round": 3},
        training={"max_length": 32},
    )
    assert partition["num_clients"] == 10 and partition["mean_top_label_share"] > 0.4
    assert (tmp_path / "out" / "partition.png").exists()
    for line in lines[1:]:
        assert {
            "val_accuracy",
            "client_accuracy_mean",
            "client_accuracy_worst",
            "client_accuracy_p10",
            "client_accuracy_std",
        } <= set(line)
        assert line["clients"] == 3 and line["clients_evaluated"] == 10
    assert lines[-1]["val_accuracy"] > lines[0]["val_accuracy"] + 0.1  # 0.16 -> 0.40
    assert "client acc mean" in stdout


def test_multilingual_natural_split_by_language(tmp_path, tiny_model_dir):
    stdout, lines, partition = run_shortened(
        "multilingual-natural.yaml",
        tmp_path,
        model={"name": str(tiny_model_dir)},
        data={"max_examples": 400},
        federation={"rounds": 1},
        training={"max_length": 32},
    )
    assert [client["client"] for client in partition["clients"]] == ["en", "zh"]
    assert partition["labels"] == ["negative", "positive"]
    english, chinese = partition["clients"]
    assert 0 < english["examples"] < chinese["examples"]  # about one review in eight is English
    for line in lines:
        assert {item["client"] for item in line["client_test"]} == {"en", "zh"} and "val_accuracy" in line
    assert lines[1]["clients"] == 2 and not lines[1]["dropped"]
    # each language's results: here one client each, so that client's own
    by_language = lines[1]["client_test_by_language"]
    for item in lines[1]["client_test"]:
        assert by_language[item["client"]]["accuracy"] == item["accuracy"]
        assert by_language[item["client"]]["clients"] == 1
