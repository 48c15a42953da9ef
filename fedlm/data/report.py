"""What each client holds: a summary (partition.json) and, when the targets are class labels, a
heatmap of labels by client (partition.png)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from fedlm.data.dataset import value_key
from fedlm.data.federated import FederatedData


def main_value(counts: dict[str, int]) -> str:
    """The most common value of a client's column (`Counter` or `column_counts`; the first by
    name on a tie)."""
    return min(counts.items(), key=lambda item: (-item[1], item[0]))[0]


def client_groups(summary: dict[str, Any] | None) -> dict[str, str]:
    """Each client's main value of the summary's column (`main_value`); none without a column."""
    if not summary or not summary.get("column"):
        return {}
    return {
        client["client"]: main_value(client["column_counts"]) for client in summary["clients"] if client["examples"]
    }


def partition_summary(federated: FederatedData, class_labels: bool = True, column: str | None = None) -> dict[str, Any]:
    """Per client: examples, test examples, and when the targets are `class_labels` the label
    histogram, top label and its share; with the `column` a partition splits on (a source, a
    topic, a language), its values' histogram as `column_counts`; plus totals."""
    labels = sorted({value_key(label) for client in federated.clients for label in client.train.labels})
    labels = labels if class_labels else []
    values = []
    if column is not None:
        values = sorted({value_key(value) for client in federated.clients for value in client.train.column(column)})
    clients = []
    for client in federated.clients:
        summary = {"client": client.name, "examples": len(client.train), "test_examples": len(client.test)}
        if class_labels:
            counts = Counter(value_key(label) for label in client.train.labels)
            top_label, top_count = min(counts.items(), key=lambda item: (-item[1], item[0]))
            summary["label_counts"] = {label: counts.get(label, 0) for label in labels}
            summary["top_label"] = top_label
            summary["top_label_share"] = top_count / len(client.train)
        if column is not None:
            counts = Counter(value_key(value) for value in client.train.column(column))
            summary["column_counts"] = {value: counts.get(value, 0) for value in values}
        clients.append(summary)
    sizes = [client["examples"] for client in clients]
    return {
        "num_clients": len(clients),
        "labels": labels,
        "train_examples": sum(sizes),
        "test_examples": sum(client["test_examples"] for client in clients),
        "validation_examples": 0 if federated.validation is None else len(federated.validation),
        "client_examples": {
            "min": min(sizes),
            "median": statistics.median(sizes),
            "max": max(sizes),
            "std": statistics.pstdev(sizes),
        },
        "mean_top_label_share": (
            statistics.fmean(client["top_label_share"] for client in clients) if class_labels else None
        ),
        "column": None if column is None else {"name": column, "values": values},
        "clients": clients,
    }


def write_partition_report(summary: dict[str, Any], folder: str | Path) -> None:
    """Write partition.json and, when it has labels or a partition column, partition.png (their
    shares by client) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "partition.json").write_text(json.dumps(summary, indent=2))
    if summary["labels"]:
        plot_label_heatmap(summary, folder / "partition.png")
    elif summary.get("column"):
        name = summary["column"]["name"]
        plot_label_heatmap(summary, folder / "partition.png", summary["column"]["values"], "column_counts", name)


def plot_label_heatmap(
    summary: dict[str, Any], path: Path, rows: list[str] | None = None, counts_key: str = "label_counts",
    what: str = "label",
) -> None:  # fmt: skip
    """A heatmap of the share of each of `rows` (the labels, or a column's values) by client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    clients, labels = summary["clients"], summary["labels"] if rows is None else rows
    counts = np.array([[client[counts_key][label] for client in clients] for label in labels], dtype=float)
    shares = counts / counts.sum(axis=0, keepdims=True)
    figure, axes = plt.subplots(figsize=(min(16, 4 + 0.3 * len(clients)), 1.5 + 0.4 * len(labels)))
    image = axes.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes.set_yticks(range(len(labels)), labels)
    if len(clients) <= 40:
        axes.set_xticks(range(len(clients)), [client["client"] for client in clients], rotation=90)
    axes.set_xlabel(f"{len(clients)} clients")
    axes.set_title(f"{what} share by client ({summary['train_examples']} training examples)")
    figure.colorbar(image, ax=axes, label="share of the client's examples")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
