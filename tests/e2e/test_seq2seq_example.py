"""examples/seq2seq_tiny_t5.py, shortened: a T5 built from a config learns Chit Chat's replies."""

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "seq2seq_tiny_t5.py"


def test_the_seq2seq_example_lowers_perplexity_and_writes_scored_samples(tmp_path):
    command = [sys.executable, str(EXAMPLE), "--pairs", "300", "--rounds", "2", "--output-dir", "runs/t5"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [record["round"] for record in records] == [1, 2]
    assert records[1]["val_perplexity"] < records[0]["val_perplexity"]
    samples = (tmp_path / "runs" / "t5" / "samples" / "round_2.jsonl").read_text().splitlines()
    assert len(samples) == 8 and all(0 <= json.loads(line)["rouge_l"] <= 1 for line in samples)
