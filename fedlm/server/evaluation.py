"""Evaluating the global model: on a (federated validation) dataset in the server's process, and
on each sampled client's own test split through the transport."""

from __future__ import annotations

import logging
from typing import Any

from fedlm.core.client_metrics import metric_distribution
from fedlm.errors import WireError
from fedlm.gate import checked_evaluation
from fedlm.protocol import ClientTransport, EvaluateIns
from fedlm.server.global_model import GlobalModel
from fedlm.tasks import Task
from fedlm.tasks.text import EncodedDataset

logger = logging.getLogger("fedlm")


def encode_dataset(
    model: GlobalModel, dataset: Any, text_column: str | None = None, label_column: str | None = None
) -> EncodedDataset:
    """Read a dataset as the federation's task reads rows, and tokenize it with the federation's
    tokenizer and metadata (encoded ones pass through)."""
    if isinstance(dataset, EncodedDataset):
        return dataset
    data = model.task.read(dataset, text_column, label_column, owner="validation set")
    owner = f"validation set {data.source}"
    return model.encode(data.texts, model.encode_targets(data.labels, owner=owner), owner)


def evaluate_dataset(model: GlobalModel, encoded: EncodedDataset) -> dict[str, float]:
    """The task's loss and metrics of the global model on an encoded dataset."""
    return model.task.evaluate(model.model(), encoded, model.options.batch_size, model.pad_id, model.options.device)


def evaluate_on_clients(
    transport: ClientTransport,
    messages: dict[str, EvaluateIns],
    test_examples: dict[str, int],
    deadline: float | None,
    round_number: int,
    task: Task,
) -> dict[str, Any]:
    """Send each client its evaluation instructions; per-client results (through the validation
    gate: a malformed reply is logged and left out) and the distribution (mean, weighted mean,
    worst, 10th percentile, std) of each of the task's metrics. Empty when no client answered."""
    results = []
    for name, reply in transport.evaluate(messages, deadline).items():
        try:
            if isinstance(reply, str):
                raise WireError(reply)
            reported = checked_evaluation(reply, test_examples[name], task.metric_ranges())
        except WireError as error:
            logger.warning("round %d: client %s failed to evaluate: %s", round_number, transport.describe(name), error)
            continue
        if reply.num_examples > 0:
            results.append({"client": name, "num_examples": reply.num_examples, **reported})
    if not results:
        return {}
    summary: dict[str, Any] = {"clients_evaluated": len(results)}
    weights = [result["num_examples"] for result in results]
    for metric in task.metrics:
        values = [result[metric] for result in results]
        distribution = metric_distribution(values, weights, higher_is_better=metric not in task.lower_is_better)
        summary.update({f"client_{metric}_{key}": value for key, value in distribution.items()})
    summary["client_test"] = results
    return summary
