"""examples/configs/seq2seq-tiny-t5.yaml, shortened: its inputs written by
examples/seq2seq_tiny_t5.py, then `fedlm run`: a T5 built from a config learns Chit Chat's replies."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import read_metrics, run_fedlm

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_the_seq2seq_example_config_lowers_perplexity_and_writes_scored_samples(tmp_path):
    prepare = [sys.executable, str(EXAMPLES / "seq2seq_tiny_t5.py"), "--pairs", "300"]
    result = subprocess.run(prepare, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((EXAMPLES / "configs" / "seq2seq-tiny-t5.yaml").read_text())
    config["federation"]["rounds"] = 2
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(config))
    result = run_fedlm("run", "short.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    output = tmp_path / "runs" / "seq2seq-tiny-t5"
    rounds = [record for record in read_metrics(output) if record["round"] >= 1]
    assert [record["round"] for record in rounds] == [1, 2]
    assert rounds[1]["val_perplexity"] < rounds[0]["val_perplexity"]
    samples = (output / "samples" / "round_2.jsonl").read_text().splitlines()
    assert len(samples) == 8 and all(0 <= json.loads(line)["rouge_l"] <= 1 for line in samples)
