"""fedlm's own cost per round in process, against the cost of copying the round's payload once.

Runs `fedlm run` as a black box (a child process) on the bundled 22.7M-parameter encoder
(~91 MB of float32 each way per client): 10 predefined clients of 16 BBC News articles at 32
tokens, all 10 per round, no evaluation, 2 threads. From the run's metrics.jsonl it takes each
round's framework overhead (`overhead_seconds`: round time minus training and evaluation) and
compares it, as a ratio, to one memory copy of the round's payload (down + up for every client)
timed in this process; it also reports the start-up and teardown (process wall time minus the
rounds), the child's peak RSS, and the bytes down against up. Targets (issue 19): overhead at
most 3x the copy, start-up to the first round under 3 s, bytes down within 1.2x of bytes up.

Prints a table and writes benchmarks/results/in_process_overhead.json. Not a test: nothing
asserts time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from flower_overhead import write_clients  # noqa: E402


def copy_seconds(num_bytes: int, repeats: int = 3) -> float:
    """The best time of one copy of `num_bytes` between two buffers already touched."""
    source = torch.ones(num_bytes // 4)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return min(times)


def run_config(folder: Path, clients: list[Path], rounds: int, threads: int) -> Path:
    config = {
        "seed": 0,
        "output_dir": str(folder / "run"),
        "model": {"name": "minilm"},
        "data": {
            "validation_fraction": 0.0,
            "client_test_fraction": 0.0,
            "partition": {"kind": "predefined", "clients": [str(path) for path in clients]},
        },
        "federation": {"rounds": rounds, "clients_per_evaluation": 0},
        "training": {"batch_size": 8, "learning_rate": 1e-4, "max_length": 32, "threads": threads},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-client", type=int, default=16, help="training examples per client")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedlm-overhead-") as tmp:
        folder = Path(tmp)
        config = run_config(folder, write_clients(folder, args.clients, args.per_client), args.rounds, args.threads)
        start = time.perf_counter()
        command = [sys.executable, "-m", "fedlm", "run", str(config)]
        finished = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if finished.returncode != 0:
            raise SystemExit(f"the run failed:\n{finished.stdout}\n{finished.stderr}")
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").open()]
    later = [record for record in records if record["round"] >= 2] or records[1:]  # round 1 warms caches
    payload = statistics.mean(record["bytes_down"] + record["bytes_up"] for record in later)
    copy = copy_seconds(int(payload))
    overhead = statistics.mean(record["overhead_seconds"] for record in later)
    result = {
        "clients": args.clients,
        "threads": args.threads,
        "round_seconds": statistics.mean(record["seconds"] for record in later),
        "train_seconds": statistics.mean(record["train_seconds"] for record in later),
        "overhead_seconds": overhead,
        "payload_megabytes": payload / 1e6,
        "payload_copy_seconds": copy,
        "overhead_over_copy": overhead / copy,
        "startup_and_teardown_seconds": wall - sum(record.get("seconds", 0.0) for record in records),
        "peak_rss_gigabytes": peak_rss / 1e9,
        "bytes_down_over_up": sum(r["bytes_down"] for r in records) / max(1, sum(r["bytes_up"] for r in records)),
    }
    table = Table(title=f"fedlm run in process: minilm, {args.clients} clients x {args.per_client} examples, "
                  f"mean of rounds 2-{args.rounds}")  # fmt: skip
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    rows = [
        ("round s", f"{result['round_seconds']:.2f}", ""),
        ("training s", f"{result['train_seconds']:.2f}", ""),
        ("overhead s", f"{overhead:.3f}", ""),
        ("payload MB (down + up)", f"{result['payload_megabytes']:,.0f}", ""),
        ("one copy of the payload s", f"{copy:.3f}", ""),
        ("overhead / copy", f"{result['overhead_over_copy']:.1f}x", "<= 3x"),
        ("start-up + teardown s", f"{result['startup_and_teardown_seconds']:.1f}", "start-up < 3"),
        ("peak RSS GB", f"{result['peak_rss_gigabytes']:.2f}", ""),
        ("bytes down / up", f"{result['bytes_down_over_up']:.2f}", "<= 1.2"),
    ]
    for row in rows:
        table.add_row(*row)
    Console(width=120).print(table)
    out = Path(__file__).parent / "results" / "in_process_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
