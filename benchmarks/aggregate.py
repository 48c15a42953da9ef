"""Aggregation speed on flat vectors against the machine's copy bandwidth and against Flower.

For K = 10 and 50 clients of 22.7M parameters (all-MiniLM-L6-v2 with a head), times fedlm's
FedAvg, FedAdam, coordinate median, trimmed mean and Krum (best of 3), reports GB/s of update
bytes read and the ratio to a plain large tensor copy measured in the same run, then Flower's
own aggregate on the same updates. Targets: FedAvg and FedAdam >= 70% of copy bandwidth and
>= 10x faster than Flower's; median and trimmed mean within 10x of FedAvg. Also the peak extra
memory of FedAvg (target: one vector, not K). Prints a table; writes benchmarks/results/aggregate.json.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedlm.core import ClientUpdate
from fedlm.core.robust import CoordinateMedian, Krum, TrimmedMean
from fedlm.core.strategies import FedAdam, FedAvg

SIZE = 22_715_141


def best_of(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth() -> float:
    """GB/s read by a copy of a 1 GB float32 tensor into a preallocated one."""
    source = torch.randn(1 << 28)
    target = torch.empty_like(source)
    return source.numel() * 4 / best_of(lambda: target.copy_(source)) / 1e9


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_memory() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def flower_timings(global_params: torch.Tensor, updates: list[ClientUpdate], with_krum: bool) -> dict[str, float]:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server import strategy as flower
    from flwr.server.strategy.aggregate import aggregate, aggregate_krum, aggregate_median, aggregate_trimmed_avg

    weights = [([(global_params + update.delta).numpy()], update.num_examples) for update in updates]
    timings = {
        "fedavg": best_of(lambda: aggregate(weights), 1),
        "median": best_of(lambda: aggregate_median(weights), 1),
        "trimmed_mean": best_of(lambda: aggregate_trimmed_avg(weights, 0.1), 1),
    }
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(w), n, {})) for w, n in weights]
    adam = flower.FedAdam(initial_parameters=ndarrays_to_parameters([global_params.numpy()]), eta=1e-2, tau=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings["fedadam"] = best_of(lambda: adam.aggregate_fit(1, results, []), 1)
    if with_krum:
        timings["krum"] = best_of(lambda: aggregate_krum(weights, 2, 0), 1)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--skip-flower", action="store_true")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    console = Console()
    rows = []
    for count in args.clients:
        generator = torch.Generator().manual_seed(count)
        global_params = torch.randn(args.size, generator=generator)
        updates = [ClientUpdate(torch.randn(args.size, generator=generator) * 0.01, 100 + i) for i in range(count)]
        update_bytes = count * args.size * 4
        before = memory_mb("VmRSS")
        reset_peak_memory()
        result = FedAvg().aggregate(global_params, updates)
        fedavg_extra_mb = memory_mb("VmHWM") - before
        del result
        ours = {
            "fedavg": FedAvg(),
            "fedadam": FedAdam(server_lr=1e-2),
            "median": FedAvg(robust=CoordinateMedian()),
            "trimmed_mean": FedAvg(robust=TrimmedMean(0.1)),
            "krum": FedAvg(robust=Krum(num_malicious=2)),
        }
        timings = {
            name: best_of(lambda s=strategy, g=global_params, u=updates: s.aggregate(g, u))
            for name, strategy in ours.items()
        }
        theirs = {} if args.skip_flower else flower_timings(global_params, updates, with_krum=count <= 10)
        for name, seconds in timings.items():
            rate = update_bytes / seconds / 1e9
            rows.append(
                {
                    "clients": count,
                    "strategy": name,
                    "seconds": seconds,
                    "gb_per_s": rate,
                    "copy_ratio": rate / bandwidth,
                    "flower_seconds": theirs.get(name),
                    "speedup_vs_flower": theirs[name] / seconds if name in theirs else None,
                }
            )
        rows[-5]["fedavg_peak_extra_mb"] = fedavg_extra_mb

    table = Table(title=f"Aggregating {args.size:,} float32 parameters; copy bandwidth {bandwidth:.1f} GB/s")
    for column in ("clients", "strategy", "seconds", "GB/s read", "of copy", "Flower (s)", "vs Flower"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for row in rows:
        table.add_row(
            str(row["clients"]),
            row["strategy"],
            f"{row['seconds']:.3f}",
            f"{row['gb_per_s']:.1f}",
            f"{row['copy_ratio']:.0%}",
            "-" if row["flower_seconds"] is None else f"{row['flower_seconds']:.2f}",
            "-" if row["speedup_vs_flower"] is None else f"{row['speedup_vs_flower']:.0f}x",
        )
    console.print(table)
    for row in rows:
        if "fedavg_peak_extra_mb" in row:
            console.print(
                f"K={row['clients']}: FedAvg peak extra memory {row['fedavg_peak_extra_mb']:.0f} MB (one vector is {args.size * 4 / 1e6:.0f} MB)"
            )
    out = Path(__file__).parent / "results" / "aggregate.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"copy_bandwidth_gb_per_s": bandwidth, "size": args.size, "rows": rows}, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
