"""Evaluating the global model: on a (federated validation) dataset in the server's process, and
on each sampled client's own test split through the transport."""

from __future__ import annotations

import logging
from typing import Any

from fedlm.core.client_metrics import metric_distribution
from fedlm.data.dataset import load_text_dataset
from fedlm.errors import WireError
from fedlm.gate import checked_evaluation
from fedlm.protocol import ClientTransport, EvaluateIns
from fedlm.server.global_model import GlobalModel
from fedlm.tasks.classification import EncodedDataset, evaluate_model

logger = logging.getLogger("fedlm")

CLIENT_METRICS = ("accuracy", "macro_f1")  # what every client's evaluation reports, summarized per round


def encode_dataset(
    model: GlobalModel, dataset: Any, text_column: str | None = None, label_column: str | None = None
) -> EncodedDataset:
    """Tokenize a dataset with the federation's tokenizer and label map (encoded ones pass through)."""
    if isinstance(dataset, EncodedDataset):
        return dataset
    data = load_text_dataset(dataset, text_column, label_column, owner="validation set")
    return model.encode(data.texts, model.label_map.encode(data.labels, owner=f"validation set {data.source}"))


def evaluate_dataset(model: GlobalModel, encoded: EncodedDataset) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of the global model on an encoded dataset."""
    return evaluate_model(model.model(), encoded, model.options.batch_size, model.pad_id, model.options.device)


def evaluate_on_clients(
    transport: ClientTransport,
    messages: dict[str, EvaluateIns],
    test_examples: dict[str, int],
    deadline: float | None,
    round_number: int,
) -> dict[str, Any]:
    """Send each client its evaluation instructions; per-client results (through the validation
    gate: a malformed reply is logged and left out) and their distribution (mean, weighted mean,
    worst, 10th percentile, std) of accuracy and macro-F1. Empty when no client answered."""
    results = []
    for name, reply in transport.evaluate(messages, deadline).items():
        try:
            if isinstance(reply, str):
                raise WireError(reply)
            metrics = checked_evaluation(reply, test_examples[name], CLIENT_METRICS)
        except WireError as error:
            logger.warning("round %d: client %s failed to evaluate: %s", round_number, transport.describe(name), error)
            continue
        if reply.num_examples > 0:
            results.append({"client": name, "num_examples": reply.num_examples, **metrics})
    if not results:
        return {}
    summary: dict[str, Any] = {"clients_evaluated": len(results)}
    weights = [result["num_examples"] for result in results]
    for metric in CLIENT_METRICS:
        distribution = metric_distribution([result[metric] for result in results], weights)
        summary.update({f"client_{metric}_{key}": value for key, value in distribution.items()})
    summary["client_test"] = results
    return summary
