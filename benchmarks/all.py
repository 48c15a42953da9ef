"""Every benchmark, one after the other: `python -m benchmarks.all [--quick] [--only NAME ...]`.

Each script also runs alone (`python benchmarks/NAME.py --help`). This runs each in its own
process with its full arguments or, with `--quick`, smaller ones chosen so that the whole suite
finishes in under 10 minutes on 2 cores (the numbers are then for a smoke check, not for
BENCHMARKS.md), prints each script's table as it comes, and writes
benchmarks/results/all.json: per script its command, exit status, wall time and the JSON it wrote.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"

# name -> (its --quick arguments, the JSON file it writes under results/)
SCRIPTS: dict[str, tuple[list[str], str]] = {
    "local_training": (["--examples", "32", "--repeats", "1"], "local_training.json"),
    "in_process_overhead": (["--clients", "4", "--rounds", "2"], "in_process_overhead.json"),
    "aggregate": (["--clients", "10"], "aggregate.json"),
    "privacy": (["--length", "100000", "--clients", "10"], "privacy.json"),
    "partition_scale": (["--skip-million"], "partition_scale.json"),
    "flower_overhead": (["--models", "tiny", "--rounds", "2"], "flower_overhead.json"),
    "lora": (["--examples", "200", "--rounds", "1", "--max-length", "32"], "lora.json"),
    "distillation": (["--examples", "200", "--rounds", "1"], "distillation.json"),
    "expert_distillation": (["--articles", "200", "--rounds", "1"], "expert_distillation.json"),
    "dp_sgd": (["--examples", "200", "--clients", "2", "--rounds", "1", "--max-length", "32"], "dp_sgd.json"),
    "private_training": (
        ["--examples", "300", "--clients", "30", "--per-round", "10", "--rounds", "2", "--max-length", "32"],
        "private_training.json",
    ),
    "seq2seq": (["--pairs", "200", "--rounds", "1"], "seq2seq.json"),
    "ner": (["--sentences", "400", "--validation", "100", "--rounds", "1"], "ner.json"),
    "causal_lm": (["--per-client", "4", "--validation", "2", "--rounds", "1", "--repeats", "1"], "causal_lm.json"),
}


def run(name: str, quick: bool) -> dict:
    arguments, output = SCRIPTS[name]
    command = [sys.executable, str(HERE / f"{name}.py"), *(arguments if quick else [])]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    finished = subprocess.run(command, cwd=HERE.parent)
    seconds = time.perf_counter() - start
    written = RESULTS / output
    result = json.loads(written.read_text()) if finished.returncode == 0 and written.exists() else None
    print(f"=== {name}: exit {finished.returncode} in {seconds:.0f} s", flush=True)
    return {"command": command[1:], "returncode": finished.returncode, "seconds": seconds, "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small arguments: the whole suite in under 10 minutes")
    parser.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), help="these scripts only")
    args = parser.parse_args()
    names = args.only or list(SCRIPTS)
    results = {name: run(name, args.quick) for name in names}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "all.json"
    out.write_text(json.dumps({"quick": args.quick, "scripts": results}, indent=2))
    failed = [name for name, result in results.items() if result["returncode"] != 0]
    total = sum(result["seconds"] for result in results.values())
    print(f"\n{len(names) - len(failed)} of {len(names)} benchmarks ran in {total / 60:.1f} min; wrote {out}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
